"""The residual MLP head starts exactly at the SAE it upgrades, and training on the frozen decoder improves it."""

from __future__ import annotations

import pytest
import torch

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.encoders.mlp import ResidualMLPEncoder

D, N = 8, 24


def source_head(name: str):
    kwargs = {"linear": {}, "topk": {"k": 4}, "jumprelu": {"threshold_init": 0.3}, "batchtopk": {"k": 4}}[name]
    head = create_encoder(name, d_model=D, n_latents=N, subtract_decoder_bias=True, **kwargs)
    if name == "batchtopk":
        head.threshold.fill_(0.2)
    return head.eval()


@pytest.mark.parametrize("name", ["linear", "topk", "jumprelu", "batchtopk"])
def test_starts_with_the_sae_codes(name):
    torch.manual_seed(0)
    dictionary = Dictionary(N, D, bias=True)
    with torch.no_grad():
        dictionary.bias.normal_()
    head = source_head(name)
    upgraded = ResidualMLPEncoder.upgrading(head, hidden=16)
    x = torch.randn(128, D)
    codes = head(x, dictionary)
    assert (codes != 0).sum() > 50
    torch.testing.assert_close(upgraded(x, dictionary), codes, rtol=0, atol=0)
    # the correction is a real MLP: moving its last layer changes the codes
    with torch.no_grad():
        upgraded.correction[-1].bias.fill_(0.5)
    assert not torch.equal(upgraded(x, dictionary), codes)


def test_training_on_the_frozen_decoder_lowers_the_sae_objective():
    torch.manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(N, D), dim=-1)
    dictionary = Dictionary.from_tensor(atoms, trainable=False, bias=torch.zeros(D))
    codes = torch.relu(torch.randn(512, N) - 1.2)
    x = codes @ atoms
    sae = source_head("linear")
    model = SparseCoder(ResidualMLPEncoder.upgrading(sae, hidden=32), dictionary, l1_coeff=0.01, lr=3e-3)
    frozen = dictionary.atoms.detach().clone()
    before = model.training_losses(x)["loss"].item()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        model.training_losses(x)["loss"].backward()
        optimizer.step()
    assert model.training_losses(x)["loss"].item() < 0.7 * before
    assert torch.equal(model.dictionary.atoms, frozen)


def test_bad_sources_and_arguments():
    with pytest.raises(ValueError, match="not 'mlp'"):
        ResidualMLPEncoder.upgrading(create_encoder("mlp", d_model=D, n_latents=N, hidden=4))
    with pytest.raises(ValueError, match="not both"):
        ResidualMLPEncoder(D, N, k=3, jump=True)


def test_a_new_k_starts_at_the_top_k_sae_with_that_k():
    torch.manual_seed(0)
    dictionary = Dictionary(N, D, bias=True)
    head = source_head("topk")
    x = torch.randn(64, D)
    fewer = ResidualMLPEncoder.upgrading(head, hidden=8, k=2)
    head.k = 2
    torch.testing.assert_close(fewer(x, dictionary), head(x, dictionary), rtol=0, atol=0)
    assert fewer.config()["k"] == 2
    with pytest.raises(ValueError, match="a 'linear' SAE has none"):
        ResidualMLPEncoder.upgrading(source_head("linear"), k=2)
