"""Iterative hard thresholding, against the textbook loop, and taking its bar from the warm-start head."""

import pytest
import torch

from sae_zoo import Dictionary, create_encoder
from sae_zoo.flops import inference_flops


def textbook_iht(x, atoms, init, threshold, steps, step_size=1.0):
    """One sample at a time: a gradient step on ||s D - x||^2 / 2, then keep the entries above the threshold."""
    lipschitz = torch.linalg.matrix_norm(atoms, 2) ** 2
    codes = init.clone()
    for i in range(len(x)):
        s = codes[i]
        for _ in range(steps):
            z = s + step_size / lipschitz * (atoms @ (x[i] - s @ atoms))
            s = torch.where(z > threshold, z, torch.zeros_like(z))
        codes[i] = s
    return codes


def test_iht_is_the_textbook_loop_from_any_start():
    torch.manual_seed(0)
    dictionary = Dictionary(40, 12, bias=True)
    with torch.no_grad():
        dictionary.bias.normal_()
    x = torch.randn(8, 12)
    init = torch.relu(torch.randn(8, 40))
    head = create_encoder("iht", d_model=12, n_latents=40, steps=7, threshold=0.2, step_size=0.8).eval()
    codes, _ = head.solve(x - dictionary.bias.detach(), dictionary.atoms.detach(), init)
    expected = textbook_iht((x - dictionary.bias).double().detach(), dictionary.atoms.double().detach(),
                            init.double(), 0.2, 7, 0.8)
    torch.testing.assert_close(codes, expected.float(), atol=1e-5, rtol=1e-5)
    assert (codes == 0).logical_or(codes > 0.2).all()


def test_iht_recovers_codes_on_an_orthonormal_dictionary_in_one_step():
    torch.manual_seed(1)
    atoms = torch.linalg.qr(torch.randn(16, 16))[0]
    dictionary = Dictionary.from_tensor(atoms)
    codes = torch.zeros(32, 16)
    for row in codes:
        row[torch.randperm(16)[:3]] = 0.5 + torch.rand(3)
    head = create_encoder("iht", d_model=16, n_latents=16, steps=1, threshold=0.3).eval()
    torch.testing.assert_close(head(codes @ atoms, dictionary), codes, atol=1e-5, rtol=1e-5)


def test_iht_takes_the_warm_start_heads_threshold_and_refines_its_codes():
    torch.manual_seed(2)
    atoms = torch.randn(64, 16)
    dictionary = Dictionary.from_tensor(atoms / atoms.norm(dim=1, keepdim=True))
    warm = create_encoder("batchtopk", d_model=16, n_latents=64, k=3)
    with torch.no_grad():
        warm.threshold.fill_(0.4)
        warm.linear.weight.copy_(dictionary.atoms)  # a tied encoder: correlations, interference included
        warm.linear.bias.zero_()
    head = create_encoder("iht", d_model=16, n_latents=64, steps=20, threshold_scale=0.5, warm_start=warm).eval()
    assert head.hard_threshold() == pytest.approx(0.2)
    true = torch.zeros(256, 64)
    for row in true:
        row[torch.randperm(64)[:3]] = 1 + torch.rand(3)
    x = true @ dictionary.atoms
    before, after = warm.eval()(x, dictionary), head(x, dictionary)
    error = lambda codes: (x - dictionary.decode(codes)).square().sum()  # noqa: E731
    assert error(after) < 0.5 * error(before)
    # the warm start, x D^T once, then per step (s D) D^T (64 latents >= 2 x 16: no Gram matrix), step and threshold
    assert inference_flops(head) == inference_flops(warm) + 2 * 16 * 64 + 20 * (4 * 64 * 16 + 4 * 64)


def test_iht_needs_a_threshold_from_somewhere():
    with pytest.raises(ValueError, match="iht needs threshold=..., or a warm_start head with a learned threshold"):
        create_encoder("iht", d_model=8, n_latents=16)
    with pytest.raises(ValueError, match="iht needs threshold=..., or a warm_start head with a learned threshold"):
        create_encoder("iht", d_model=8, n_latents=16, warm_start={"name": "linear"})
    with pytest.raises(ValueError, match=r"0 < step_size < 2"):
        create_encoder("iht", d_model=8, n_latents=16, threshold=0.1, step_size=2.5)
