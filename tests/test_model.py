import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.metrics import functional


def trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", **kwargs)


def test_forward_and_loss_are_the_papers():
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("linear", d_model=4, n_latents=6), Dictionary(6, 4), l1_coeff=0.3)
    x = torch.randn(10, 4)
    x_hat, codes = model(x)
    torch.testing.assert_close(codes, torch.relu(model.encoder.linear(x)))
    torch.testing.assert_close(x_hat, codes @ model.dictionary.weight)
    losses = model.training_losses(x)
    torch.testing.assert_close(losses["loss"], F.mse_loss(x_hat, x) + 0.3 * codes.abs().mean())
    torch.testing.assert_close(losses["l0"], (codes != 0).sum(-1).float().mean())


def test_shapes_must_agree():
    with pytest.raises(ValueError, match=r"maps 4 -> 6 latents.*n_latents=7, d_model=4"):
        SparseCoder(create_encoder("linear", d_model=4, n_latents=6), Dictionary(7, 4))


def test_settings_follow_from_dictionary_and_supervision():
    head = create_encoder("linear", d_model=4, n_latents=6)
    assert SparseCoder(head, Dictionary(6, 4)).setting == "unknown"
    assert SparseCoder(head, Dictionary(6, 4, trainable=False)).setting == "known_dictionary"
    assert SparseCoder(head, Dictionary(6, 4, trainable=False), supervised=True).setting == "known_codes"


def test_known_dictionary_training_improves_codes_and_keeps_the_decoder():
    dm = SyntheticSparseDataModule(n_train=256, n_test=256, steps_per_epoch=100)
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("linear", d_model=8, n_latents=16), Dictionary.from_tensor(dm.dictionary))
    atoms = model.dictionary.weight.detach().clone()
    torch.testing.assert_close(atoms, dm.dictionary)
    before = functional.mcc(model.encode(dm.test_x), dm.test_codes).item()
    trainer(600).fit(model, dm)
    assert torch.equal(model.dictionary.weight, atoms)
    after = functional.mcc(model.encode(dm.test_x), dm.test_codes).item()
    assert after > before + 0.05


def test_unknown_setting_learns_unit_norm_atoms():
    dm = SyntheticSparseDataModule(n_train=256, n_test=64, steps_per_epoch=100)
    torch.manual_seed(0)
    dictionary = Dictionary(16, 8)
    start = dictionary.weight.detach().clone()
    model = SparseCoder(create_encoder("linear", d_model=8, n_latents=16), dictionary, lr=1e-2,
                        true_dictionary=dm.dictionary)
    t = trainer(300)
    t.fit(model, dm)
    assert not torch.allclose(model.dictionary.weight, start)
    torch.testing.assert_close(model.dictionary.weight.norm(dim=1), torch.ones(16))
    results = t.test(model, dm, verbose=False)[0]
    expected = functional.dictionary_mcc(model.dictionary.weight, dm.dictionary).item()
    assert results["test/dictionary_mcc"] == pytest.approx(expected, abs=1e-6)


def test_known_codes_training_follows_the_true_codes():
    dm = SyntheticSparseDataModule(n_train=256, n_test=256, steps_per_epoch=100)
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("mlp", d_model=8, n_latents=16, hidden=64),
                        Dictionary.from_tensor(dm.dictionary), supervised=True, lr=3e-3)
    before = functional.correlation_matrix(model.encode(dm.test_x), dm.test_codes).diagonal().mean().item()
    # before training the best matching (MCC's) beats the identity, so the equality below can fail
    assert functional.mcc(model.encode(dm.test_x), dm.test_codes).item() > before + 0.1
    t = trainer(400)
    t.fit(model, dm)
    results = t.test(model, dm, verbose=False)[0]
    # supervised training aligns latent i with true latent i: the unmatched per-latent correlation rises
    corr = functional.correlation_matrix(model.encode(dm.test_x), dm.test_codes)
    assert corr.diagonal().mean().item() > max(0.7, before + 0.4)
    # and the best matching of latents to true latents (MCC's) is then the identity: latent i is true latent i
    assert results["test/mcc"] == pytest.approx(corr.diagonal().mean().item(), abs=1e-5)


def test_test_metrics_equal_the_functional_ones():
    dm = SyntheticSparseDataModule(n_train=128, n_test=200, batch_size=64, steps_per_epoch=10)
    torch.manual_seed(1)
    model = SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3), Dictionary.from_tensor(dm.dictionary))
    t = trainer(20)
    t.fit(model, dm)
    results = t.test(model, dm, verbose=False)[0]
    with torch.no_grad():
        x_hat, codes = model(dm.test_x)
    assert results["test/mcc"] == pytest.approx(functional.mcc(codes, dm.test_codes).item(), abs=1e-6)
    assert results["test/fvu"] == pytest.approx(functional.fraction_of_variance_unexplained(x_hat, dm.test_x).item(),
                                                 rel=1e-5)
    assert results["test/l0"] == pytest.approx(functional.l0(codes).item(), rel=1e-6)
    assert results["test/mse"] == pytest.approx(F.mse_loss(x_hat, dm.test_x).item(), rel=1e-5)


def test_checkpoint_round_trip_gives_identical_codes(tmp_path):
    dm = SyntheticSparseDataModule(n_train=64, n_test=64, steps_per_epoch=5)
    model = SparseCoder(create_encoder("mlp", d_model=8, n_latents=16, hidden=[12, 10]), Dictionary(16, 8),
                        l1_coeff=0.05)
    t = trainer(10)
    t.fit(model, dm)
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = SparseCoder.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.encoder.config() == model.encoder.config() and loaded.l1_coeff == 0.05
    x = dm.test_x
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.dictionary.weight, model.dictionary.weight)


@pytest.mark.parametrize("option, value", [("target_l0", 3.0), ("auxk_coeff", 0.1), ("matryoshka_widths", [2, 6]),
                                           ("resample_every", 10), ("sparsity_warmup_steps", 5)])
def test_known_codes_training_refuses_what_its_loss_ignores(option, value):
    """``supervised=True`` trains on the true codes alone; a target L0, AuxK or Matryoshka prefixes would be ignored
    (and a target L0 would still shift the thresholds at the end), so each is refused by name."""
    head = create_encoder("linear", d_model=4, n_latents=6)
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r} would be ignored")):
        SparseCoder(head, Dictionary(6, 4, trainable=False), supervised=True, **{option: value})


def batches_seen(**options) -> torch.Tensor:
    """The first inputs of every training batch a short run sees (shuffled batches of 32, several passes)."""
    dm = SyntheticSparseDataModule(n_train=128, n_test=64, batch_size=32)
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("linear", d_model=8, n_latents=16),
                        Dictionary(16, 8, bias=True), bias_init_samples=64, **options)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0][:, 0].clone())

    trainer(12, callbacks=[Record()]).fit(model, dm)
    return torch.cat(seen)


@pytest.mark.parametrize("options", [{"decoder_bias_init": "mean"}, {"target_l0": 3.0}])
def test_reading_a_start_sample_leaves_the_training_batches_as_they_were(options):
    """A run whose start reads training rows (a decoder-bias start, a target L0) trains on the very batches an
    otherwise equal run does: seed-matched runs are data-matched."""
    plain = batches_seen()
    assert len(plain) == 12 * 32 and not torch.equal(plain[:128], plain[128:256])  # shuffled anew each pass
    assert torch.equal(batches_seen(**options), plain)


def test_the_model_holds_structure_and_its_training_is_one_config():
    """``SparseCoder`` takes its head, dictionary, training config and family (at most 8 arguments); the training
    options written flat, as recipes and saved checkpoints write them, are read into the same config."""
    import inspect

    from sae_zoo import TrainingConfig

    assert len(inspect.signature(SparseCoder.__init__).parameters) - 1 <= 8
    head = create_encoder("topk", d_model=4, n_latents=6, k=2)
    flat = SparseCoder(head, Dictionary(6, 4), lr=3e-3, auxk_coeff=0.1, matryoshka_widths=[3, 6])
    config = SparseCoder(head, Dictionary(6, 4), TrainingConfig(lr=3e-3, auxk_coeff=0.1, matryoshka_widths=[3, 6]))
    as_dict = SparseCoder(head, Dictionary(6, 4), {"lr": 3e-3, "auxk_coeff": 0.1, "matryoshka_widths": [3, 6]})
    assert flat.training_config == config.training_config == as_dict.training_config
    assert flat.hparams == config.hparams and flat.lr == 3e-3 and flat.dead_latents.auxk_coeff == 0.1
    with pytest.raises(TypeError, match="lr both in training and as an argument"):
        SparseCoder(head, Dictionary(6, 4), {"lr": 1e-3}, lr=3e-3)
    with pytest.raises(TypeError, match="unexpected argument.* l1_cof"):
        SparseCoder(head, Dictionary(6, 4), l1_cof=0.1)
