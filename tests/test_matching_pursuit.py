"""Matching pursuit and OMP, against the textbook loop."""

import torch

from sae_zoo import Dictionary, create_encoder


def textbook_mp(x, atoms, k):
    """One sample at a time: pick the atom most positively correlated with the residual, add its projection."""
    codes = torch.zeros(x.shape[0], atoms.shape[0], dtype=x.dtype)
    for i, sample in enumerate(x):
        residual = sample.clone()
        for _ in range(k):
            correlation = atoms @ residual
            j = int(correlation.argmax())
            if correlation[j] <= 0:
                break
            value = correlation[j] / atoms[j].dot(atoms[j])
            codes[i, j] += value
            residual -= value * atoms[j]
    return codes


def test_mp_is_the_textbook_algorithm_with_any_atom_norms():
    torch.manual_seed(0)
    rows = torch.randn(24, 8) * torch.linspace(0.5, 2, 24)[:, None]
    dictionary = Dictionary.from_tensor(rows, keep_norms=True)
    x = torch.randn(16, 8)
    head = create_encoder("mp", d_model=8, n_latents=24, k=5).eval()
    codes = head(x, dictionary)
    torch.testing.assert_close(codes, textbook_mp(x.double(), rows.double(), 5).float(), atol=1e-5, rtol=1e-5)
    assert ((codes != 0).sum(-1) <= 5).all() and (codes >= 0).all()
    residual = (x - dictionary.decode(codes)).norm(dim=-1)
    assert (residual < x.norm(dim=-1)).all()


def test_omp_recovers_exactly_sparse_codes_that_mp_only_approaches():
    torch.manual_seed(0)
    dictionary = Dictionary(48, 24)
    support = torch.stack([torch.randperm(48)[:3] for _ in range(32)])
    true = torch.zeros(32, 48).scatter(1, support, 1 + torch.rand(32, 3))
    x = dictionary.decode(true)
    omp = create_encoder("mp", d_model=24, n_latents=48, k=3, orthogonal=True).eval()
    mp = create_encoder("mp", d_model=24, n_latents=48, k=3).eval()
    omp_error = (dictionary.decode(omp(x, dictionary)) - x).norm(dim=-1)
    mp_error = (dictionary.decode(mp(x, dictionary)) - x).norm(dim=-1)
    assert (omp_error < 1e-4).float().mean() > 0.9  # the right support, and least squares on it
    torch.testing.assert_close(omp(x, dictionary)[omp_error < 1e-4], true[omp_error < 1e-4], atol=1e-4, rtol=1e-4)
    assert mp_error.mean() > 10 * omp_error.mean()


def test_mp_stops_once_every_residual_is_small():
    torch.manual_seed(0)
    dictionary = Dictionary.from_tensor(torch.eye(6))
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0, 0.0, 0.0]])
    head = create_encoder("mp", d_model=6, n_latents=6, k=6, residual_threshold=0.5).eval()
    codes = head(x, dictionary)
    torch.testing.assert_close(codes, x)  # orthonormal atoms: MP is exact
    assert head.last_iterations == 2  # two picks, after which every residual is below the threshold
