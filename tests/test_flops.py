import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sae_zoo import Dictionary, create_encoder, flops
from sae_zoo.data import SyntheticSparseDataModule


def test_the_papers_formulas():
    m, n = 8, 16
    assert flops.sae_inference(m, n) == 4 * m * n + n
    assert flops.sae_training_step(m, n) == 10 * m * n + 5 * n
    assert flops.sae_training_step(m, n, learn_dictionary=True) == 13 * m * n + 5 * n
    assert flops.mlp_inference(m, n, 32) == 2 * m * 32 + 32 + 2 * 32 * n + n + 2 * n * m
    # "10k steps on 1024 samples ~ 7.2e9 FLOPs"; 20k steps 1.44e10
    assert 1024 * flops.ito_inference(m, n, 10_000) == pytest.approx(7.2e9, rel=0.01)
    assert 1024 * flops.ito_inference(m, n, 20_000) == pytest.approx(1.44e10, rel=0.01)


def test_heads_count_as_the_paper_does():
    sae = create_encoder("linear", d_model=8, n_latents=16, bias=False)
    assert flops.inference_flops(sae) == flops.sae_inference(8, 16)
    assert flops.training_step_flops(sae) == flops.sae_training_step(8, 16)
    assert flops.training_step_flops(sae, learn_dictionary=True) == flops.sae_training_step(8, 16, True)
    mlp = create_encoder("mlp", d_model=8, n_latents=16, hidden=256)
    assert flops.inference_flops(mlp) == flops.mlp_inference(8, 16, 256)
    ito = create_encoder("ito", d_model=8, n_latents=16, steps=10_000)
    assert flops.inference_flops(ito) == flops.ito_inference(8, 16, 10_000)
    assert flops.training_step_flops(ito) == 0  # nothing to train on a known dictionary
    warm = create_encoder("ito", d_model=8, n_latents=16, steps=100, warm_start={"name": "linear"})
    assert flops.training_step_flops(warm) == flops.sae_training_step(8, 16)
    assert flops.inference_flops(warm) == flops.ito_inference(8, 16, 100) + 2 * 8 * 16 + 16


def test_fista_at_100_iterations_costs_about_7e7_for_the_test_set():
    fista = create_encoder("fista", d_model=8, n_latents=16, steps=100)
    assert 1024 * flops.inference_flops(fista) == pytest.approx(7e7, rel=0.05)


def test_counts_follow_the_iterations_actually_run():
    fista = create_encoder("fista", d_model=8, n_latents=16, steps=1000, tol=1e-3, check_every=10).eval()
    before = flops.inference_flops(fista)
    dm = SyntheticSparseDataModule(n_train=8, n_test=64)
    fista(dm.test_x, Dictionary.from_tensor(dm.dictionary))
    assert fista.last_iterations < 1000 and flops.inference_flops(fista) < before


@pytest.mark.parametrize("name, kwargs", [("linear", {"bias": False}), ("mlp", {"hidden": [32, 24], "bias": False}),
                                          ("lista", {"layers": 5})])
def test_matmul_counts_match_torchs_flop_counter(name, kwargs):
    head = create_encoder(name, d_model=8, n_latents=16, **kwargs)
    dictionary = Dictionary(16, 8)
    x = torch.randn(64, 8)
    head(x, dictionary)  # LISTA sets itself up from the dictionary on its first call
    with FlopCounterMode(display=False) as counter:
        dictionary.decode(head(x, dictionary))
    matmul, _ = head.encode_flops()
    assert counter.get_total_flops() == 64 * (matmul + flops.decode_flops(8, 16))
