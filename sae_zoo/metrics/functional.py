"""Functional forms of the metrics, and the update/compute helpers they share with the streaming
``Metric`` classes (as torchmetrics does): ``_x_update`` turns one batch into summed sufficient
statistics, ``_x_compute`` turns summed statistics into the value. A class adds up the updates of
every batch (and every DDP rank); the function computes from one update. So both give one answer.

Arguments come in torchmetrics' order, prediction first: ``(codes, true_codes)``, ``(atoms,
true_atoms)``, ``(x_hat, x)``. Tensors have the feature (latent or model) dimension last and samples
in the leading dimensions.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

#: A latent whose variance over the samples is below this counts as never firing: correlation 0.
VARIANCE_TOL = 1e-12


def _flat(t: Tensor) -> Tensor:
    return t.detach().reshape(-1, t.shape[-1])


def _require_samples(n: Tensor, what: str) -> None:
    if bool((n == 0).any()):  # n may hold one count per weighting (bootstrap resamples)
        raise ValueError(f"{what} of no samples is undefined: every batch given to it was empty")


# ---- code recovery ----

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


def matched_mean(similarity: Tensor, over: str = "rows") -> Tensor:
    """Mean of ``|similarity|`` over a Hungarian matching of rows to columns that maximises it.

    ``over="rows"``: the mean is over the rows (the reference side), and rows left unmatched, when there
    are fewer columns than rows, count as 0. ``over="matches"``: the mean over the matched pairs only
    (SynthSAEBench's MCC, where an SAE narrower than the true features is scored on what it has).
    """
    if over not in ("rows", "matches"):
        raise ValueError(f"over must be 'rows' or 'matches', got {over!r}")
    score = similarity.abs().detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.tensor(score[rows, cols].sum() / (score.shape[0] if over == "rows" else len(rows)),
                        dtype=torch.float64)


def _mcc_update(codes: Tensor, true_codes: Tensor) -> tuple[Tensor, ...]:
    """``(n, sum_x, sum_y, sum_xx, sum_yy, sum_xy)`` in float64, ``x`` the true codes, ``y`` the codes."""
    y, x = _flat(codes).double(), _flat(true_codes).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"codes have {y.shape[0]} samples ({tuple(codes.shape)}), true codes have {x.shape[0]} "
                         f"({tuple(true_codes.shape)})")
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    return n, x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), x.T @ y


def _mcc_compute(n: Tensor, sum_x: Tensor, sum_y: Tensor, sum_xx: Tensor, sum_yy: Tensor, sum_xy: Tensor) -> Tensor:
    _require_samples(n, "MCC")
    return matched_mean(correlation_from_moments(n, sum_x, sum_y, sum_xx, sum_yy, sum_xy))


def correlation_matrix(codes: Tensor, true_codes: Tensor) -> Tensor:
    """``|true| x |inferred|`` Pearson correlations over samples (float64)."""
    n, *moments = _mcc_update(codes, true_codes)
    _require_samples(n, "a correlation")
    return correlation_from_moments(n, *moments)


def mcc(codes: Tensor, true_codes: Tensor) -> Tensor:
    """Mean correlation coefficient: mean ``|corr|`` between each true latent and its Hungarian match."""
    return _mcc_compute(*_mcc_update(codes, true_codes))


def atom_similarity(atoms: Tensor, true_atoms: Tensor) -> Tensor:
    """``|true| x |learned|`` cosine similarities between dictionary atoms (rows), in float64."""
    if atoms.shape[-1] != true_atoms.shape[-1]:
        raise ValueError(f"atoms have width {atoms.shape[-1]}, true atoms have width {true_atoms.shape[-1]}")
    a = torch.nn.functional.normalize(atoms.detach().double(), dim=-1)
    t = torch.nn.functional.normalize(true_atoms.detach().double(), dim=-1)
    return t @ a.T


def dictionary_matching(over: str) -> str:
    """The :func:`matched_mean` side of a dictionary MCC taken ``over`` the true atoms or the matches."""
    if over not in ("true", "matches"):
        raise ValueError(f"over must be 'true' or 'matches', got {over!r}")
    return "rows" if over == "true" else "matches"


def dictionary_mcc(atoms: Tensor, true_atoms: Tensor, over: str = "true") -> Tensor:
    """Mean ``|cosine similarity|`` between each true atom and its Hungarian match among ``atoms``
    (``over="true"``: a true atom left without a match counts 0), or over the matched pairs alone
    (``over="matches"``: SynthSAEBench's and SAELens's decoder MCC; they differ when there are fewer
    atoms than true ones)."""
    return matched_mean(atom_similarity(atoms, true_atoms), over=dictionary_matching(over))


# ---- reconstruction ----

def _fvu_update(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum of squared errors, per-feature sum of x, sum of ||x||^2, n)`` in float64."""
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat and x must have the same shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}")
    x64, x_hat64 = _flat(x).double(), _flat(x_hat).double()
    n = torch.tensor(float(x64.shape[0]), dtype=torch.float64, device=x64.device)
    return (x64 - x_hat64).pow(2).sum(), x64.sum(0), x64.pow(2).sum(), n


def _fvu_compute(sum_squared_error: Tensor, sum_x: Tensor, sum_squared_x: Tensor, n: Tensor) -> Tensor:
    _require_samples(n, "FVU")
    return sum_squared_error / (sum_squared_x - sum_x.pow(2).sum(-1) / n)


def fraction_of_variance_unexplained(x_hat: Tensor, x: Tensor) -> Tensor:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over all samples."""
    return _fvu_compute(*_fvu_update(x_hat, x))


# ---- sparsity ----

def _l0_update(codes: Tensor) -> tuple[Tensor, Tensor]:
    """``(summed count of non-zero codes, n)``."""
    flat = _flat(codes)
    return (flat != 0).sum().double(), torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=flat.device)


def _l1_update(codes: Tensor) -> tuple[Tensor, Tensor]:
    """``(summed |codes|, n)``."""
    flat = _flat(codes)
    return flat.double().abs().sum(), torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=flat.device)


def _per_sample_mean_compute(total: Tensor, n: Tensor) -> Tensor:
    _require_samples(n, "a per-sample mean")
    return total / n


def _dead_latents_update(codes: Tensor) -> Tensor:
    """How often each latent fired."""
    return (_flat(codes) != 0).sum(0).double()


def _dead_latents_compute(fire_count: Tensor) -> Tensor:
    return (fire_count == 0).double().mean()


def l0(codes: Tensor) -> Tensor:
    """Mean number of non-zero latents per sample."""
    return _per_sample_mean_compute(*_l0_update(codes))


def l1(codes: Tensor) -> Tensor:
    """Mean L1 norm of the codes per sample."""
    return _per_sample_mean_compute(*_l1_update(codes))


def dead_latents(codes: Tensor) -> Tensor:
    """Fraction of latents that are zero on every sample."""
    _require_samples(torch.tensor(float(_flat(codes).shape[0])), "the dead-latent fraction")
    return _dead_latents_compute(_dead_latents_update(codes))


# ---- latents as feature detectors (SynthSAEBench's classification metrics) ----

def best_matches(atoms: Tensor, true_atoms: Tensor) -> Tensor:
    """For each learned atom, the index of the true atom with the largest ``|cosine similarity|``."""
    return atom_similarity(atoms, true_atoms).abs().argmax(dim=0)


def _detection_update(codes: Tensor, true_codes: Tensor, matches: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per latent, ``(TP, FP, FN, TN)`` of "the latent is non-zero" against "its matched true feature is
    active" (``matches[i]`` for latent ``i``). Exact zeros only: a tiny non-zero code counts as firing."""
    if codes.shape[-1] != matches.shape[0]:
        raise ValueError(f"codes have {codes.shape[-1]} latents, the matches {matches.shape[0]}")
    fires = _flat(codes) != 0
    truth = _flat(true_codes)[:, matches] > 0
    counts = [(fires & truth), (fires & ~truth), (~fires & truth), (~fires & ~truth)]
    return tuple(c.sum(0).double() for c in counts)


def _detection_compute(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, Tensor]:
    """Means over latents of precision, recall, F1 and accuracy (0 where a ratio is undefined)."""
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300),
                     torch.zeros_like(tp))
    accuracy = (tp + tn) / (tp + fp + fn + tn).clamp_min(1)
    return {"precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean(), "accuracy": accuracy.mean()}


def latent_detection(codes: Tensor, true_codes: Tensor, atoms: Tensor, true_atoms: Tensor) -> dict[str, Tensor]:
    """Each latent as a detector of the true feature its atom matches best: mean precision, recall, F1 and
    accuracy over latents (SynthSAEBench's, Chanin & Garriga-Alonso 2026)."""
    return _detection_compute(*_detection_update(codes, true_codes, best_matches(atoms, true_atoms)))


def _uniqueness_update(atoms: Tensor, true_atoms: Tensor) -> tuple[Tensor, Tensor]:
    """``(uniqueness of this dictionary, 1)``: one snapshot."""
    value = best_matches(atoms, true_atoms).unique().numel() / atoms.shape[0]
    return torch.tensor(value, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)


def feature_uniqueness(atoms: Tensor, true_atoms: Tensor) -> Tensor:
    """Distinct true features among the latents' best matches, over the number of latents (1: no two
    latents track the same feature)."""
    return _per_sample_mean_compute(*_uniqueness_update(atoms, true_atoms))


def _shrinkage_update(x_hat: Tensor, x: Tensor, min_norm: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(summed ||x_hat|| / ||x||, n)`` over the samples whose ``||x||`` exceeds ``min_norm``."""
    norms = _flat(x).double().norm(dim=-1)
    valid = norms > min_norm
    return (_flat(x_hat).double().norm(dim=-1)[valid] / norms[valid]).sum(), valid.sum().double()


def shrinkage(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean ratio of the reconstruction's norm to the input's (1: no shrinkage; an L1 penalty shrinks)."""
    return _per_sample_mean_compute(*_shrinkage_update(x_hat, x))
