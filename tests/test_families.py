"""Model families, the one config object a saved model is, scoring apart from the model, and one way to write a
schedule."""

import lightning as L
import pytest
import torch

from sae_zoo import Dictionary, SparseCoder, TrainingConfig, create_encoder
from sae_zoo.data import Pair, SyntheticSparseDataModule
from sae_zoo.families import FAMILIES, ModelFamily, create_family, family_from_config, list_families, register_family
from sae_zoo.metrics import Scoring
from sae_zoo.model_config import ModelConfig
from sae_zoo.sparsity import SparsityControl


def head(d_model=8, n_latents=16, name="topk", **kwargs):
    return create_encoder(name, d_model=d_model, n_latents=n_latents, **({"k": 3} if "topk" in name else {}), **kwargs)


def test_the_families_are_registered_and_a_new_one_is_a_class_of_its_own():
    assert {"sae", "transcoder", "clt"} <= set(list_families())

    @register_family("denoiser_test")
    class Denoiser(ModelFamily):
        """Reconstructs a clean target from a noisy input of the same width."""

        paired = True

        def split(self, batch, d_out):
            return batch.x, batch.target, None

    try:
        model = SparseCoder(head(), Dictionary(16, 8, trainable=True), family="denoiser_test")
        assert model.family.name == "denoiser_test" and model.transcoder is True
        assert model.hparams["family"] == "denoiser_test"
        x, clean = torch.randn(4, 8), torch.randn(4, 8)
        losses = model.training_losses(Pair(x, clean))
        # its loss is the target's reconstruction error, not the input's
        x_hat = model(x).x_hat
        assert losses["mse"].item() == pytest.approx((x_hat - clean).square().mean().item(), rel=1e-5)
        rebuilt = SparseCoder(**model.hparams)
        assert rebuilt.family.name == "denoiser_test"
    finally:
        del FAMILIES["denoiser_test"]
    with pytest.raises(ValueError, match="unknown model family .nope.; registered: clt, sae, transcoder"):
        SparseCoder(head(), Dictionary(16, 8), family="nope")
    with pytest.raises(ValueError, match="family='sae' and transcoder=True disagree"):
        SparseCoder(head(), Dictionary(16, 8), family="sae", transcoder=True)


def test_the_transcoder_keys_models_have_always_saved_name_the_family():
    old = {"transcoder": True, "skip_connection": True, "train_skip": False}
    family = family_from_config(old)
    assert family.name == "transcoder" and family.skip_connection and not family.train_skip
    assert family.config() == old and family_from_config({}).name == "sae"
    by_name = SparseCoder(head(), Dictionary(16, 5), family={"name": "transcoder", "skip_connection": True})
    by_keys = SparseCoder(head(), Dictionary(16, 5), transcoder=True, skip_connection=True)
    assert by_name.hparams == by_keys.hparams and by_name.skip is not None and by_name.skip.weight.requires_grad


def test_a_model_is_one_config_that_rebuilds_it():
    training = TrainingConfig(lr=3e-3, target_l0=4, lr_warmup_steps=0.1, auxk_coeff=0.03)
    model = SparseCoder(head(name="linear"), Dictionary(16, 5, trainable=True), training, family="transcoder")
    config = model.config()
    assert config.to_dict() == dict(model.hparams)  # checkpoints save it
    again = ModelConfig.from_dict(config.to_dict())
    assert again.training == config.training and again.family.config() == config.family.config()
    rebuilt = SparseCoder(again.encoder, again.dictionary, again.training, family=again.family)
    assert rebuilt.config().to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="config.json: unknown key\\(s\\) 'l1_coef'"):
        ModelConfig.from_dict({**config.to_dict(), "l1_coef": 1.0}, where="config.json")
    with pytest.raises(ValueError, match="config.json: lr must be positive, got -1"):
        ModelConfig.from_dict({**config.to_dict(), "lr": -1}, where="config.json")


def test_save_pretrained_keeps_the_training_config_and_the_card_reads_it(tmp_path):
    model = SparseCoder(head(name="linear"), Dictionary(16, 8, trainable=True), TrainingConfig(lr=3e-3, target_l0=4,
                                                                                  sparsity_warmup_steps=0.25))
    model.save_pretrained(tmp_path / "m")
    loaded = SparseCoder.from_pretrained(tmp_path / "m")
    assert loaded.training_config == model.training_config
    assert SparseCoder.from_pretrained(tmp_path / "m", lr=1e-4).lr == 1e-4  # any training option may be set
    card = (tmp_path / "m" / "README.md").read_text()
    assert "`target_l0=4`" in card and "`sparsity_warmup_steps=0.25`" in card and "learning rate 0.003" in card


def test_scoring_is_built_from_what_the_data_know_and_set_apart_from_the_model():
    dm = SyntheticSparseDataModule(d_model=8, n_latents=12, n_train=256, n_test=128, batch_size=64, k=2)
    dm.setup("fit")
    learned = Scoring.from_data(dm)
    assert learned.code_recovery and torch.equal(learned.true_dictionary, dm.dictionary)
    assert Scoring.from_data(dm, learned=False).true_dictionary is None
    assert not Scoring.from_data(dm, code_recovery=False).code_recovery

    model = SparseCoder(head(n_latents=12), Dictionary(12, 8, trainable=True))
    assert set(model.new_metrics().metrics) >= {"mcc"} and "dictionary_mcc" not in model.new_metrics().metrics
    model.score_with(learned)
    assert "dictionary_mcc" in model.val_metrics.metrics and model.true_dictionary is dm.dictionary
    metrics = model.new_metrics(sync_on_compute=False)
    batch = next(iter(dm.test_dataloader()))
    model.update_metrics(metrics, batch)
    assert model.update_dictionary_metrics(metrics)
    # the dictionary's MCC is the functional one, on the scoring's true atoms
    from sae_zoo.metrics.functional import dictionary_mcc
    assert metrics.metrics["dictionary_mcc"].compute().item() == pytest.approx(
        dictionary_mcc(model.dictionary.directions, dm.dictionary, over="matches").item(), abs=1e-6)
    with pytest.raises(ValueError, match="true_dictionary must have shape \\(n, 8\\), got \\(12, 5\\)"):
        model.score_with(Scoring(true_dictionary=torch.randn(12, 5)))


def test_every_schedule_takes_steps_or_a_fraction_of_the_run():
    # the sparsity warm-up: a quarter of a 40-step run is 10 steps
    by_steps, by_fraction = SparsityControl(1.0, warmup_steps=10), SparsityControl(1.0, warmup_steps=0.25)
    assert [float(by_steps.value(s, 40)) for s in range(12)] == [float(by_fraction.value(s, 40)) for s in range(12)]
    assert float(by_fraction.value(4, 40)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sparsity_warmup_steps=0.25 is a fraction of the run, which needs a known"):
        by_fraction.value(3, float("inf"))
    with pytest.raises(ValueError, match="sparsity_warmup_steps >= 1 counts steps, so it must be a whole number"):
        TrainingConfig(sparsity_warmup_steps=2.5)

    # k annealing: over 10 steps, or over a quarter of a 40-step run, alike
    ks = {}
    for name, option in {"steps": {"k_anneal_steps": 10}, "fraction": {"k_anneal_steps": 0.25},
                         "older spelling": {"k_anneal_fraction": 0.25}}.items():
        encoder = head(k_anneal=3.0, **option)
        seen = []
        for step in range(14):
            encoder.on_train_progress(step / 40, step)
            seen.append(encoder.training_k)
        ks[name] = seen
    assert ks["steps"] == ks["fraction"] == ks["older spelling"]
    assert ks["steps"][0] == 9 and ks["steps"][5] == 6 and ks["steps"][10:] == [3] * 4
    with pytest.raises(ValueError, match="k_anneal_steps=10 and k_anneal_fraction=0.5 both set how long k anneals"):
        head(k_anneal=3.0, k_anneal_steps=10, k_anneal_fraction=0.5)
    stepped = head(k_anneal=3.0, k_anneal_steps=10)
    stepped.on_train_progress(None, 5)  # a length in steps needs no known run length
    assert stepped.training_k == 6


def test_a_fractional_sparsity_warm_up_trains_as_the_same_number_of_steps():
    def fit(warmup):
        dm = SyntheticSparseDataModule(d_model=8, n_latents=12, n_train=512, n_test=64, batch_size=64, k=2, seed=3)
        torch.manual_seed(0)
        model = SparseCoder(head(name="linear", n_latents=12), Dictionary(12, 8, trainable=True), l1_coeff=0.1,
                            sparsity_warmup_steps=warmup)
        L.Trainer(max_steps=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(model, dm)
        return model.state_dict()

    steps, fraction, none = fit(4), fit(0.25), fit(0)
    assert all(torch.equal(steps[k], fraction[k]) for k in steps)
    assert not all(torch.equal(steps[k], none[k]) for k in steps)  # the warm-up changed the run


def test_recipes_write_the_family_and_the_fields_aids_either_way():
    from sae_zoo.recipe import build, load_recipe

    base = ["data.d_model=8", "data.n_latents=12", "data.n_train=256", "data.n_test=64", "setting=unknown",
            "encoder.name=topk", "encoder.k=2", "dictionary.bias=true"]
    flat = build(load_recipe("recipes/synthetic/unknown.yaml", [*base, "model.auxk_coeff=0.03"]))[1]
    spelled = build(load_recipe("recipes/synthetic/unknown.yaml",
                                [*base, "model.aids=[{name: auxk, coeff: 0.03}]"]))[1]
    assert flat.hparams == spelled.hparams and spelled.dead_latents.auxk_coeff == 0.03
    assert flat.scoring.code_recovery and flat.true_dictionary is not None  # from what the data know
    with pytest.raises(ValueError, match="model: a transcoder learns a target from an input"):
        build(load_recipe("recipes/synthetic/unknown.yaml", [*base, "model.family=transcoder"]))


def test_create_family_refuses_options_the_family_lacks():
    with pytest.raises(TypeError, match="model family 'sae'"):
        create_family("sae", skip_connection=True)
    with pytest.raises(ValueError, match="skip_connection=True adds a linear map .* a transcoder's"):
        SparseCoder(head(), Dictionary(16, 8), skip_connection=True)
