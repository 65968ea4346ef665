"""Functional forms of the metrics, and the helpers the streaming ``Metric`` classes share.

All functions take tensors whose last dimension is the feature (latent or model) dimension and
whose leading dimensions are samples.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

#: A latent whose variance over the samples is below this counts as never firing: correlation 0.
VARIANCE_TOL = 1e-12


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def correlation_from_moments(n: Tensor, sum_x: Tensor, sum_y: Tensor, sum_xx: Tensor, sum_yy: Tensor,
                             sum_xy: Tensor, variance_tol: float = VARIANCE_TOL) -> Tensor:
    """Pearson correlation matrix ``(len(sum_x), len(sum_y))`` from summed sufficient statistics.

    Pairs where either side has (population) variance below ``variance_tol`` get correlation 0.
    """
    mean_x, mean_y = sum_x / n, sum_y / n
    var_x = (sum_xx / n - mean_x**2).clamp_min(0)
    var_y = (sum_yy / n - mean_y**2).clamp_min(0)
    cov = sum_xy / n - torch.outer(mean_x, mean_y)
    alive = torch.outer(var_x >= variance_tol, var_y >= variance_tol)
    denom = torch.sqrt(torch.outer(var_x, var_y))
    return torch.where(alive, cov / denom.where(alive, torch.ones_like(denom)), torch.zeros_like(cov))


def matched_mean(similarity: Tensor) -> Tensor:
    """Mean of ``|similarity|`` over a Hungarian matching of rows to columns that maximises it.

    The mean is over the rows (the reference side): rows left unmatched, when there are fewer
    columns than rows, count as 0.
    """
    score = similarity.abs().detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.tensor(score[rows, cols].sum() / score.shape[0], dtype=torch.float64)


def correlation_matrix(true_codes: Tensor, codes: Tensor) -> Tensor:
    """``|true| x |inferred|`` Pearson correlations over samples (float64)."""
    x, y = _flat(true_codes).double(), _flat(codes).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"true codes have {x.shape[0]} samples, codes have {y.shape[0]}")
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64)
    return correlation_from_moments(n, x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), x.T @ y)


def mcc(codes: Tensor, true_codes: Tensor) -> Tensor:
    """Mean correlation coefficient: mean ``|corr|`` between each true latent and its Hungarian match."""
    return matched_mean(correlation_matrix(true_codes, codes))


def atom_similarity(true_atoms: Tensor, atoms: Tensor) -> Tensor:
    """``|true| x |learned|`` cosine similarities between dictionary atoms (rows), in float64."""
    if atoms.shape[-1] != true_atoms.shape[-1]:
        raise ValueError(f"atoms have width {atoms.shape[-1]}, true atoms have width {true_atoms.shape[-1]}")
    a = torch.nn.functional.normalize(atoms.detach().double(), dim=-1)
    t = torch.nn.functional.normalize(true_atoms.detach().double(), dim=-1)
    return t @ a.T


def dictionary_mcc(atoms: Tensor, true_atoms: Tensor) -> Tensor:
    """Mean ``|cosine similarity|`` between each true atom and its Hungarian match among ``atoms``."""
    return matched_mean(atom_similarity(true_atoms, atoms))


def fraction_of_variance_unexplained(x_hat: Tensor, x: Tensor) -> Tensor:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all samples."""
    x, x_hat = _flat(x).double(), _flat(x_hat).double()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def l0(codes: Tensor) -> Tensor:
    """Mean number of non-zero latents per sample."""
    return (_flat(codes) != 0).sum(-1).double().mean()


def l1(codes: Tensor) -> Tensor:
    """Mean L1 norm of the codes per sample."""
    return _flat(codes).double().abs().sum(-1).mean()


def dead_latents(codes: Tensor) -> Tensor:
    """Fraction of latents that are zero on every sample."""
    return ((_flat(codes) != 0).sum(0) == 0).double().mean()
