"""A cross-layer transcoder trained by a recipe from one pass of a tiny Llama over its layers, judged with every MLP of
its span replaced; the replacement pass checked against the LM's own MLPs (CE recovered 1) and against zeroing."""

from __future__ import annotations

import pytest
import torch

import sae_zoo
from sae_zoo.cli import main
from sae_zoo.clt_recipe import build_clt, clt_data
from sae_zoo.dashboard import dashboard
from sae_zoo.lm import intercept, read_activations
from sae_zoo.evaluation.replacement import Replacement, replacement_ce, replacement_fvu
from sae_zoo.recipe import RecipeError, fit, recipe_from_content


def clt_recipe(lm_files, tmp_path, **model):
    lm, files = lm_files
    return {"setting": "unknown", "seed": 1,
            "data": {"name": "activations", "model": lm, "data_files": files, "context_len": 16, "n_train_tokens": 1200,
                     "n_test_tokens": 300, "test_stride": 4, "batch_size": 100, "model_batch_size": 8,
                     "cache_dir": str(tmp_path / "cache"), "ce_contexts": 8, "buffer_contexts": 40,
                     "stats_tokens": 300, "normalize": True},
            "dictionary": {"n_latents": 16}, "encoder": {"name": "batchtopk", "k": 2},
            "model": {"family": "clt", "layers": [0, 1], "lr": 3e-3, "auxk_coeff": 0.03, "dead_tokens": 200, **model},
            "trainer": {"max_steps": 12, "accelerator": "cpu", "log_every_n_steps": 4},
            "run_dir": str(tmp_path / "run")}


@pytest.fixture(scope="module")
def clt_run(lm_files, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("clt")
    cfg = recipe_from_content(clt_recipe(lm_files, tmp_path))
    run_dir, metrics = fit(cfg, progress=False)
    return cfg, run_dir, metrics


def test_a_clt_recipe_trains_from_one_pass_and_is_judged_with_its_mlps_replaced(clt_run):
    cfg, run_dir, metrics = clt_run
    test = metrics["test"]
    assert metrics["family"] == "clt" and metrics["layers"] == [0, 1] and metrics["steps"] == 12
    assert 0 < test["l0_summed"] <= 4 and all(0 < test[f"fvu_layer_{i}"] < 5 for i in (0, 1))
    # a random tiny LM barely needs its MLPs, so the recovered share is noise; the losses themselves are measured
    assert all(torch.isfinite(torch.tensor(test[k])) for k in ("ce_clean", "ce_spliced", "ce_zero_ablation"))
    loaded = sae_zoo.load_sae(run_dir)  # the run folder, as for an SAE's run (its model/ folder)
    clt = loaded.model()
    assert clt.layers == [0, 1] and len(clt.provenance["input_scales"]) == 2
    data, _ = clt_data(cfg)
    data.prepare_data()
    again = replacement_fvu(clt, data)
    assert again["fvu_layer_1"] == pytest.approx(test["fvu_layer_1"], rel=1e-6)


def test_a_clt_run_exports_to_circuit_tracer_with_its_raw_activations_outputs(clt_run, tmp_path):
    cfg, run_dir, _ = clt_run
    assert main(["export", str(run_dir), str(tmp_path / "ct"), "--to", "circuit_tracer"]) == 0
    clt = sae_zoo.load_sae(run_dir / "model").model()
    exported = sae_zoo.load_sae(tmp_path / "ct").model()  # read back as circuit-tracer's files
    scales = torch.tensor(clt.provenance["input_scales"])[:, None]
    target_scales = torch.tensor(clt.provenance["target_scales"])[:, None]
    raw = torch.randn(20, 2, clt.d_in)
    with torch.no_grad():
        torch.testing.assert_close(exported(raw).outputs, clt(raw * scales).outputs / target_scales, rtol=1e-4,
                                   atol=1e-5)
    assert main(["export", str(run_dir), str(tmp_path / "sl")]) == 2  # SAELens has no CLT format: named, refused


def test_a_clt_runs_dashboard_shows_where_each_latent_writes(clt_run, tmp_path):
    _, run_dir, _ = clt_run
    out = dashboard(run_dir, tmp_path / "dash", n_latents=3, contexts=16, layer=0)
    page = next(out.glob("latent-*.html")).read_text()
    assert "Where it writes" in page and 'id="norms-' in page and "CLT layer 0" in page
    with pytest.raises(ValueError, match=r"--layer 5: .* spans blocks \[0, 1\]"):
        dashboard(run_dir, tmp_path / "bad", layer=5)


class LMsOwnMLPs(Replacement):
    """The LM's own MLPs, as a replacement: the replaced model is the LM itself."""

    def __init__(self, data):
        self.parts = list(data.parts.values())
        self.mlps = [part.target_hook.module for part in self.parts]
        self.n_layers = len(self.mlps)

    def step(self, layer, x):
        part = self.parts[layer]
        out = self.mlps[layer].forward(x / part.scale) * part.target_scale  # forward: not its hooks again
        return out, x


class Zeroes(LMsOwnMLPs):
    def step(self, layer, x):
        return torch.zeros(len(x), self.parts[layer].d_out), x


class ShiftedFirst(LMsOwnMLPs):
    """Block 0's own MLP output plus a shift; every layer's input recorded as it is given."""

    def __init__(self, data, shift):
        super().__init__(data)
        self.shift, self.seen = shift, {0: [], 1: []}

    def step(self, layer, x):
        self.seen[layer].append(x.clone())
        out, codes = super().step(layer, x)
        return (out + self.shift if layer == 0 else out), codes


def test_the_replacement_pass_feeds_each_layer_its_edited_input(lm_files, tmp_path):
    cfg = recipe_from_content(clt_recipe(lm_files, tmp_path))
    data, _ = clt_data(cfg)
    data.prepare_data()
    figures = replacement_ce({"own": LMsOwnMLPs(data), "zero": Zeroes(data)}, data)
    assert figures["own"]["ce_spliced"] == pytest.approx(figures["own"]["ce_clean"], abs=1e-5)
    assert figures["own"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert figures["zero"]["ce_spliced"] == pytest.approx(figures["zero"]["ce_zero_ablation"], abs=1e-5)
    # block 1 is given the input of the stream block 0's replacement left, read here apart with block 0's output shifted
    parts = list(data.parts.values())
    shift = torch.linspace(-3, 3, parts[0].d_out)
    shifted = ShiftedFirst(data, shift)
    replacement_ce({"shifted": shifted}, data)
    tokens, _, keep_first = parts[0].ce_batches()
    lm = parts[0].language_model()[0]

    def shift_block_0(acts):
        moved = acts + shift / parts[0].target_scale
        return torch.cat([acts[:, :1], moved[:, 1:]], 1) if keep_first else moved

    with intercept(parts[0].target_hook, shift_block_0):
        edited = read_activations(lm, parts[1].language_model()[2], tokens).flatten(0, 1) * parts[1].scale
    clean = read_activations(lm, parts[1].language_model()[2], tokens).flatten(0, 1) * parts[1].scale
    given = torch.cat(shifted.seen[1])
    torch.testing.assert_close(given, edited, rtol=1e-4, atol=1e-4)
    assert (given - clean).norm() > 0.01 * clean.norm()  # far beyond the tolerance the match holds to
    fvu = replacement_fvu(LMsOwnMLPs(data), data)
    assert fvu["fvu_layer_0"] == pytest.approx(0.0, abs=1e-5) and fvu["fvu_layer_1"] == pytest.approx(0.0, abs=1e-5)


def test_bad_clt_recipes_are_refused_by_key(lm_files, tmp_path):
    with pytest.raises(RecipeError, match=r"layers: \[0, 2\] are not consecutive"):
        recipe_from_content(clt_recipe(lm_files, tmp_path, layers=[0, 2]))
    with pytest.raises(RecipeError, match=r"encoder.name: 'ista' is iterative"):
        recipe_from_content({**clt_recipe(lm_files, tmp_path), "encoder": {"name": "ista"}})
    with pytest.raises(RecipeError, match=r"model.tied_init: not an option of a cross-layer transcoder"):
        recipe_from_content(clt_recipe(lm_files, tmp_path, tied_init=True))
    import yaml
    (tmp_path / "clt.yaml").write_text(yaml.safe_dump(clt_recipe(lm_files, tmp_path)))
    assert main(["fit", str(tmp_path / "clt.yaml"), "--evals", "core"]) == 2  # named, before it trains
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"hook 'mlp_in.6': the model has blocks 0..2"):  # before any forward pass
        build_clt(recipe_from_content(clt_recipe(lm_files, tmp_path, layers=[6, 7])))


def test_a_killed_clt_run_resumes_to_the_weights_of_an_uninterrupted_run(lm_files, tmp_path, monkeypatch):
    """Stopped at step 7 of 12 with checkpoints every 4 steps: the resumed run goes on from step 4 (the weights, Adam,
    the sparsity controller, the dead-latent counts and the data's stream position) to the uninterrupted run's end."""
    from sae_zoo import CrossLayerTranscoder
    from sae_zoo.recipe import resume_recipe

    def recipe(name):
        content = clt_recipe(lm_files, tmp_path, auxk_coeff=0.1, dead_tokens=100)
        content.update(checkpoint_every=4, run_dir=str(tmp_path / name), encoder={"name": "jumprelu"},
                       model={**content["model"], "target_l0": 6.0, "auxk_coeff": 0.0, "lr_decay_steps": 4})
        return recipe_from_content(content)

    whole, _ = fit(recipe("whole"), progress=False)
    end = CrossLayerTranscoder.on_train_batch_end

    def stop_at_7(self, outputs, batch, batch_idx):
        end(self, outputs, batch, batch_idx)
        if self.global_step == 7:
            raise RuntimeError("pre-empted")  # as a job that dies mid-run: no model written, the checkpoint left
    monkeypatch.setattr(CrossLayerTranscoder, "on_train_batch_end", stop_at_7)
    with pytest.raises(RuntimeError, match="pre-empted"):
        fit(recipe("killed"), progress=False)
    monkeypatch.setattr(CrossLayerTranscoder, "on_train_batch_end", end)
    assert (tmp_path / "killed" / "checkpoint.ckpt").is_file() and not (tmp_path / "killed" / "metrics.json").exists()
    resumed, metrics = fit(resume_recipe(tmp_path / "killed"), progress=False, resume=True)
    assert metrics["steps"] == 12
    a, b = (sae_zoo.load_sae(run).model() for run in (whole, resumed))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
