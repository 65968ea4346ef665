"""SAEBench's core figures: the CE and KL scores equal SAELens's own ``get_recons_loss`` on the same SAE and contexts,
and the shape figures (cosine similarity, L2 ratio, relative reconstruction bias) equal their formulas."""

import pytest
import torch
from lm_fixtures import sae_recipe, write_tiny_llama

from sae_zoo.evaluation import ProbingConfig, ce_baselines, ce_loss_recovered, evaluate_model
from sae_zoo.hub import export_saelens, load_run
from sae_zoo.lm import lm_logits
from sae_zoo.recipe import build, fit, recipe_from_content

sae_lens = pytest.importorskip("sae_lens")  # a test extra: SAELens's own code is the reference


@pytest.fixture(scope="module")
def trained(lm_files, tmp_path_factory):
    """A top-k SAE trained on a tiny Llama's residual stream after block 1, with its data."""
    tmp_path = tmp_path_factory.mktemp("core")
    model_dir = write_tiny_llama(tmp_path / "model", initializer_range=0.3)  # a residual stream the loss needs
    files = lm_files[1]
    cfg = recipe_from_content(sae_recipe(model_dir, files, tmp_path, n_latents=64, k=6, max_steps=120, ce_contexts=12))
    run_dir, _ = fit(cfg, progress=False)
    datamodule, _ = build(cfg)
    return load_run(run_dir)[0].eval(), datamodule, tmp_path


class HookedLM(torch.nn.Module):
    """What SAELens's ``get_recons_loss`` reads of a TransformerLens model (a call and ``run_with_hooks``, each
    giving logits and per-token losses), answered by the transformers LM with the hook spliced at one place."""

    def __init__(self, lm, hook):
        super().__init__()
        self.lm, self.hook = lm, hook

    @staticmethod
    def _both(logits, tokens):
        logprobs = logits.float().log_softmax(-1)[:, :-1]
        return logits, -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)

    def forward(self, tokens, return_type="both", loss_per_token=True):
        return self._both(lm_logits(self.lm, tokens), tokens)

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True):
        (_, hook_fn), = fwd_hooks
        return self._both(lm_logits(self.lm, tokens, self.hook, lambda acts: hook_fn(acts, None)), tokens)


def test_the_ce_and_kl_scores_are_saelens_get_recons_loss(trained):
    from sae_lens import SAE
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    model, datamodule, tmp_path = trained
    ours = ce_loss_recovered(model, datamodule, every_position=True)
    # SAELens's SAE from our export, on raw activations (the data's scale folded in), spliced at every position
    sae = SAE.load_from_disk(str(export_saelens(model, tmp_path / "saelens", hook_name="resid_post.1")), device="cpu")
    lm, _, hook = datamodule.language_model()
    tokens, _, _ = datamodule.ce_batches()
    with torch.no_grad():
        parts = [get_recons_loss(sae, HookedLM(lm, hook), ActivationScaler(), chunk, compute_kl=True,
                                 compute_ce_loss=True, hook_name="resid_post.1") for chunk in tokens.split(5)]
    theirs = {key: torch.cat([p[key] for p in parts]).mean().item() for key in parts[0]}
    ce_score = ((theirs["ce_loss_with_ablation"] - theirs["ce_loss_with_sae"])
                / (theirs["ce_loss_with_ablation"] - theirs["ce_loss_without_sae"]))
    kl_score = (theirs["kl_div_with_ablation"] - theirs["kl_div_with_sae"]) / theirs["kl_div_with_ablation"]
    assert 0.2 < ce_score < 0.999 and 0.2 < kl_score < 0.999  # a score that tells an SAE apart from its ablation
    assert ours["ce_loss_recovered"] == pytest.approx(ce_score, abs=0.005)
    assert ours["kl_div_score"] == pytest.approx(kl_score, abs=0.005)
    assert ours["kl_div_spliced"] == pytest.approx(theirs["kl_div_with_sae"], rel=1e-3)
    assert ours["ce_clean"] == pytest.approx(theirs["ce_loss_without_sae"], rel=1e-4)
    assert ours["ce_every_position"] is True

    # sae_zoo's default keeps BOS and the outlier tokens: another measurement, which the baselines must share
    kept = ce_loss_recovered(model, datamodule)
    assert kept["ce_every_position"] is False and kept["kl_div_spliced"] != pytest.approx(ours["kl_div_spliced"])
    with pytest.raises(ValueError, match="every_position=True, but the baselines edited the positions the data hold"):
        ce_loss_recovered(model, datamodule, ce_baselines(datamodule), every_position=True)


def test_the_shape_figures_are_saebench_cores(trained):
    model, datamodule, _ = trained
    figures = evaluate_model(model, datamodule, ProbingConfig(enabled=False)).figures()
    rows = datamodule.held_out_rows()
    x = torch.cat([batch[~rows.outliers(batch)] for batch in rows])  # the clean held-out tokens
    with torch.no_grad():
        x_hat = model(x).x_hat
    x, x_hat = x.double(), x_hat.double()
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
    ratio = (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()
    bias = x_hat.square().sum(-1).mean() / (x * x_hat).sum(-1).mean()
    assert figures["cossim"] == pytest.approx(cos.item(), abs=1e-6)
    assert figures["l2_ratio"] == pytest.approx(ratio.item(), abs=1e-6)
    assert figures["relative_reconstruction_bias"] == pytest.approx(bias.item(), abs=1e-6)
    assert 0 < figures["cossim_se"] < 0.1 and 0.5 < figures["l2_ratio"] < 1.5
