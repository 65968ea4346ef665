"""Code and dictionary recovery: MCC with Hungarian matching, streamed over batches."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from .functional import (_mcc_compute, _mcc_update, atom_similarity, correlation_from_moments, dictionary_matching,
                         matched_mean)


class MCC(Metric):
    """Mean correlation coefficient between inferred and true codes.

    Accumulates the sufficient statistics of every (true latent, inferred latent) Pearson
    correlation (sums of x, y, x^2, y^2, x y^T and the sample count, in float64) so the result over
    many batches, or many DDP ranks, equals the result on all samples at once. ``compute`` matches
    true latents to inferred ones with the Hungarian algorithm on ``|corr|`` and returns the mean
    over the true latents. A latent that never varies counts as correlation 0.

    Args:
        num_latents: width of the inferred codes.
        num_true_latents: width of the true codes (default: ``num_latents``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_latents: int, num_true_latents: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        n_pred, n_true = num_latents, num_true_latents or num_latents
        self.num_latents, self.num_true_latents = n_pred, n_true
        f64 = dict(dtype=torch.float64)
        self.add_state("n", default=torch.tensor(0.0, **f64), dist_reduce_fx="sum")
        self.add_state("sum_x", default=torch.zeros(n_true, **f64), dist_reduce_fx="sum")
        self.add_state("sum_y", default=torch.zeros(n_pred, **f64), dist_reduce_fx="sum")
        self.add_state("sum_xx", default=torch.zeros(n_true, **f64), dist_reduce_fx="sum")
        self.add_state("sum_yy", default=torch.zeros(n_pred, **f64), dist_reduce_fx="sum")
        self.add_state("sum_xy", default=torch.zeros(n_true, n_pred, **f64), dist_reduce_fx="sum")

    def update(self, codes: Tensor, true_codes: Tensor) -> None:
        if codes.shape[-1] != self.num_latents or true_codes.shape[-1] != self.num_true_latents:
            raise ValueError(f"MCC expects codes (n, {self.num_latents}) and true codes (n, {self.num_true_latents}), "
                             f"got {tuple(codes.shape)} and {tuple(true_codes.shape)}")
        n, sum_x, sum_y, sum_xx, sum_yy, sum_xy = _mcc_update(codes, true_codes)
        self.n += n
        self.sum_x += sum_x
        self.sum_y += sum_y
        self.sum_xx += sum_xx
        self.sum_yy += sum_yy
        self.sum_xy += sum_xy

    def correlation(self) -> Tensor:
        """The ``(num_true_latents, num_latents)`` Pearson correlation matrix of what was seen."""
        return correlation_from_moments(self.n, self.sum_x, self.sum_y, self.sum_xx, self.sum_yy, self.sum_xy)

    def compute(self) -> Tensor:
        return _mcc_compute(self.n, self.sum_x, self.sum_y, self.sum_xx, self.sum_yy, self.sum_xy)


class DictionaryMCC(Metric):
    """Mean ``|cosine similarity|`` between true atoms and learned atoms after Hungarian matching.

    Each ``update(atoms, true_atoms)`` adds one snapshot of the dictionary; ``compute`` scores the
    mean similarity matrix of the snapshots (under DDP every rank holds the same dictionary, so the
    result is the single-process one). ``over="true"``: the mean over the true atoms, an unmatched one
    counting 0; ``over="matches"``: over the matched pairs (SynthSAEBench's and SAELens's MCC). They
    differ only when there are fewer learned atoms than true ones.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_latents: int, num_true_latents: int | None = None, over: str = "true", **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_latents, self.num_true_latents = num_latents, num_true_latents or num_latents
        self.matching = dictionary_matching(over)  # checks over
        self.add_state("similarity_sum", default=torch.zeros(self.num_true_latents, num_latents, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("snapshots", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, atoms: Tensor, true_atoms: Tensor) -> None:
        if atoms.shape[0] != self.num_latents or true_atoms.shape[0] != self.num_true_latents:
            raise ValueError(f"DictionaryMCC expects atoms ({self.num_latents}, d) and true atoms "
                             f"({self.num_true_latents}, d), got {tuple(atoms.shape)} and {tuple(true_atoms.shape)}")
        self.similarity_sum += atom_similarity(atoms, true_atoms).abs()
        self.snapshots += 1

    def compute(self) -> Tensor:
        if float(self.snapshots) == 0:
            raise ValueError("DictionaryMCC of no dictionary: call update(atoms, true_atoms) first")
        return matched_mean(self.similarity_sum / self.snapshots, over=self.matching)


__all__ = ["MCC", "DictionaryMCC"]
