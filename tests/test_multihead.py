"""Several heads from one pass over the data train exactly as each would alone."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.multihead import HeadBank
from sae_zoo.training import TrainingAid

D, N = 8, 24


def models(dictionary: Dictionary) -> dict[str, SparseCoder]:
    torch.manual_seed(3)
    return {"linear": SparseCoder(create_encoder("linear", d_model=D, n_latents=N), dictionary, l1_coeff=0.05,
                                  lr=1e-2, target_l0=4.0),
            "mlp": SparseCoder(create_encoder("mlp", d_model=D, n_latents=N, hidden=16), dictionary, l1_coeff=0.01,
                               lr=3e-3),
            "topk_auxk": SparseCoder(create_encoder("topk", d_model=D, n_latents=N, k=3), dictionary, l1_coeff=0.0,
                                     lr=3e-3, auxk_coeff=0.1, dead_tokens=64)}


def fit(module: L.LightningModule, batches: list[torch.Tensor]) -> None:
    trainer = L.Trainer(max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", log_every_n_steps=5)
    trainer.fit(module, DataLoader(batches, batch_size=None))


def test_a_bank_trains_each_head_exactly_as_alone():
    atoms = torch.nn.functional.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    dictionary = Dictionary.from_tensor(atoms, trainable=False)
    g = torch.Generator().manual_seed(1)
    batches = [torch.relu(torch.randn(32, N, generator=g) - 1) @ atoms for _ in range(40)]
    together = models(dictionary)
    untrained = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in together.items()}
    fit(HeadBank(together), batches)
    alone = models(dictionary)
    for name, model in alone.items():
        fit(model, batches)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(together[name].state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
        assert any(not torch.equal(v, untrained[name][k]) for k, v in model.state_dict().items())
    assert together["linear"].l1_coeff == pytest.approx(alone["linear"].l1_coeff) != 0.05  # the target L0 tuned it


def full_method_models() -> dict[str, SparseCoder]:
    """Models that each learn their own dictionary (learned atom norms, trained at their own rate) with the whole of
    a training method: LR warm-up and decay, resampling (which clears its own optimiser's state), AuxK, a decoder
    bias started from the data, Matryoshka prefixes, a target L0 with a warm-up of the sparsity."""
    torch.manual_seed(5)
    return {"matryoshka": SparseCoder(create_encoder("batchtopk", d_model=D, n_latents=N, k=3),
                                      Dictionary(N, D, trainable=True, bias=True, atom_norms="learned"), lr=3e-3,
                                      matryoshka_widths=[8, N], auxk_coeff=0.1, dead_tokens=64, resample_every=15,
                                      lr_warmup_steps=5, lr_decay_steps=0.2, decoder_bias_init="mean",
                                      bias_init_samples=64),
            "jumprelu": SparseCoder(create_encoder("jumprelu", d_model=D, n_latents=N),
                                    Dictionary(N, D, trainable=True, bias=True), lr=1e-2, target_l0=4.0,
                                    sparsity_warmup_steps=10, lr_warmup_steps=0.1, bias_init_samples=64)}


def test_a_bank_keeps_each_models_whole_training_method(tmp_path):
    g = torch.Generator().manual_seed(2)
    atoms = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    batches = [torch.relu(torch.randn(32, N, generator=g) - 1) @ atoms for _ in range(40)]
    together = full_method_models()
    fit(HeadBank(together), batches)
    alone = full_method_models()
    for name, model in alone.items():
        fit(model, batches)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(together[name].state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert together["jumprelu"].l1_coeff == pytest.approx(alone["jumprelu"].l1_coeff)


def test_a_bank_trains_learned_atom_norms_at_their_own_rate():
    """Learned atom norms train at ``lr * dictionary.norm_lr_scale`` in a bank as alone (not at ``lr``)."""
    def norm_models() -> dict[str, SparseCoder]:
        torch.manual_seed(7)
        return {"norms": SparseCoder(create_encoder("topk", d_model=D, n_latents=N, k=3),
                                     Dictionary(N, D, trainable=True, atom_norms="learned"), lr=3e-3, l1_coeff=0.0)}

    g = torch.Generator().manual_seed(4)
    atoms = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    batches = [torch.relu(torch.randn(32, N, generator=g) - 1) @ atoms * 3 for _ in range(20)]
    together, alone = norm_models(), norm_models()
    fit(HeadBank(together), batches)
    fit(alone["norms"], batches)
    norms = alone["norms"].dictionary.atom_norms.detach()
    assert (norms - 1).abs().max() > 0.05  # at lr alone they would hardly move from 1
    torch.testing.assert_close(together["norms"].dictionary.atom_norms.detach(), norms, rtol=1e-6, atol=1e-6)


def test_a_bank_refuses_shared_trained_parameters_and_solo_aids():
    dictionary = Dictionary(N, D, trainable=True)
    with pytest.raises(ValueError, match="share a trained parameter"):
        HeadBank({"a": SparseCoder(create_encoder("linear", d_model=D, n_latents=N), dictionary),
                  "b": SparseCoder(create_encoder("linear", d_model=D, n_latents=N), dictionary)})
    frozen = Dictionary(N, D, trainable=False)

    class OwnOptimiser(TrainingAid):  # a further aid that needs its model's own trainer says so
        name, solo = "own_optimiser", True

        def config(self):
            return {"name": self.name}

    with pytest.raises(ValueError, match="'a' sets the 'own_optimiser' aid, which needs its own trainer"):
        HeadBank({"a": SparseCoder(create_encoder("linear", d_model=D, n_latents=N), frozen, aids=[OwnOptimiser()])})
