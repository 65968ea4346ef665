"""The iterative heads solve the paper's per-sample objective; warm starts are really used."""

import pytest
import torch

from sae_zoo import Dictionary, create_encoder, list_encoders
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.metrics import functional


@pytest.fixture(scope="module")
def data():
    dm = SyntheticSparseDataModule(n_train=64, n_test=256)
    return dm.test_x, dm.test_codes, Dictionary.from_tensor(dm.dictionary)


def head(name, **kwargs):
    return create_encoder(name, d_model=8, n_latents=16, **kwargs).eval()


def kkt_violation(codes, x, atoms, l1_coeff=0.01):
    """Optimality of the non-negative lasso f(s) = ||sD - x||^2/M + l1 ||s||_1/N: the gradient of the
    smooth part plus l1/N is 0 where s > 0 and >= 0 where s = 0."""
    m, n = atoms.shape[1], atoms.shape[0]
    g = 2 / m * (codes @ atoms - x) @ atoms.T + l1_coeff / n
    return torch.where(codes > 0, g.abs(), torch.relu(-g)).max().item()


def test_iterative_heads_are_registered():
    assert {"ito", "ista", "fista", "lista", "lca", "support_search"} <= set(list_encoders())


@pytest.mark.parametrize("name, steps", [("fista", 3000), ("ista", 20000), ("lca", 20000)])
def test_solvers_reach_the_lasso_optimum(data, name, steps):
    x, _, d = data
    codes = head(name, steps=steps)(x, d)
    assert (codes >= 0).all()
    assert kkt_violation(codes, x, d.atoms) < 1e-4
    reference = head("fista", steps=3000)(x, d)
    torch.testing.assert_close(codes, reference, atol=5e-3, rtol=0)


def test_fista_beats_ista_at_equal_iterations(data):
    x, true, d = data
    objective = head("ista").objective
    f = {name: objective(head(name, steps=50)(x, d), x, d.atoms).mean().item() for name in ("ista", "fista")}
    assert f["fista"] < f["ista"]


def test_ito_reproduces_the_papers_known_dictionary_figure():
    """The paper: ITO from log_s = -10, Adam lr 1e-3, 20k steps on the 1024 test samples gives MCC 0.967
    (its loss is a batch mean); optimising each sample on its own scale does better."""
    dm = SyntheticSparseDataModule()
    d = Dictionary.from_tensor(dm.dictionary)
    paper = head("ito", steps=20_000, batch_mean=True)(dm.test_x, d)
    assert functional.mcc(paper, dm.test_codes).item() == pytest.approx(0.967, abs=0.002)
    per_sample = head("ito", steps=20_000)(dm.test_x, d)
    assert functional.mcc(per_sample, dm.test_codes).item() > 0.98


def test_ito_warm_start_changes_the_start_and_the_steps_needed(data):
    x, true, d = data
    warm = {"name": "fista", "steps": 200}
    fista_codes = head("fista", steps=200)(x, d)
    warm_head = head("ito", warm_start=warm)
    torch.testing.assert_close(warm_head.initial_log_codes(x, fista_codes).exp(), fista_codes.clamp_min(1e-2))
    assert torch.equal(head("ito").initial_log_codes(x, None), torch.full((len(x), 16), -10.0))

    objective = warm_head.objective
    target = 1.05 * objective(head("fista", steps=3000)(x, d), x, d.atoms).mean()

    def steps_needed(warm_start):
        for steps in (25, 50, 100, 200, 400, 800, 1600, 3200, 6400):
            codes = head("ito", steps=steps, lr=1e-2, warm_start=warm_start)(x, d)
            if objective(codes, x, d.atoms).mean() <= target:
                return steps
        return float("inf")

    assert steps_needed(warm) * 8 <= steps_needed(None) < float("inf")
    # in training mode the warm-start head's own codes come back, so an amortised warm start trains
    amortised = head("ito", warm_start={"name": "linear", "bias": False}).train()
    torch.testing.assert_close(amortised(x, d), torch.relu(x @ amortised.warm_start.linear.weight.T))


def test_fista_warm_started_at_the_optimum_stops_at_once(data):
    x, _, d = data
    optimum = head("fista", steps=3000)(x, d)
    solver = head("fista", steps=3000, tol=1e-4, check_every=5)
    codes, warm_iterations = solver.solve(x, d.atoms, optimum)
    _, cold_iterations = solver.solve(x, d.atoms, None)
    assert warm_iterations <= 10 < 5 * warm_iterations < cold_iterations
    torch.testing.assert_close(codes, optimum, atol=1e-4, rtol=0)


def test_k_sparse_projection(data):
    x, _, d = data
    for name in ("fista", "ito"):
        codes = head(name, k=3, steps=200)(x, d)
        assert ((codes > 0).sum(-1) <= 3).all()


def test_support_refinement_and_search_remove_the_l1_bias(data):
    x, true, d = data
    plain = functional.mcc(head("fista", steps=100)(x, d), true).item()
    refined = functional.mcc(head("fista", steps=100, refine_rounds=1)(x, d), true).item()
    assert refined > plain
    exact = head("support_search", max_support=3)(x, d)
    assert functional.mcc(exact, true).item() == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(exact, true, atol=1e-3, rtol=0)  # x itself is rounded to float32


def test_support_search_refuses_combinatorial_sizes():
    with pytest.raises(ValueError, match="exceed max_subsets"):
        create_encoder("support_search", d_model=64, n_latents=512, max_support=9)


def test_lista_starts_as_ista_and_learns(data):
    x, true, d = data
    lista = head("lista", layers=12)
    ista = head("ista", steps=12)
    torch.testing.assert_close(lista(x, d), ista(x, d), atol=1e-5, rtol=0)
    lista.train()
    optim = torch.optim.Adam(lista.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        codes = lista(x, d)
        loss = torch.nn.functional.mse_loss(d.decode(codes), x) + 0.01 * codes.abs().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_iterative_heads_need_the_dictionary(data):
    x, _, _ = data
    with pytest.raises(ValueError, match="needs the dictionary"):
        head("fista")(x)


def test_heads_work_under_inference_mode(data):
    x, _, d = data
    with torch.inference_mode():
        assert head("ito", steps=20)(x, d).shape == (len(x), 16)


def test_sparse_coding_trains_free_codes_with_the_dictionary():
    dm = SyntheticSparseDataModule(n_train=64, n_test=32)
    d = Dictionary(16, 8)
    sc = create_encoder("sparse_coding", d_model=8, n_latents=16, n_train=64, steps=50).train()
    codes = sc(dm.train_x, d)
    torch.testing.assert_close(codes, sc.log_codes.exp())
    loss = torch.nn.functional.mse_loss(d.decode(codes), dm.train_x) + 0.01 * codes.abs().mean()
    loss.backward()
    assert sc.log_codes.grad.abs().sum() > 0 and d.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="full batches of n_train=64"):
        sc(dm.test_x, d)
    sc.eval()
    ito = head("ito", steps=50, lr=3e-3, batch_mean=True)
    torch.testing.assert_close(sc(dm.test_x, d), ito(dm.test_x, d))  # new inputs: ITO on the learned dictionary
