"""Reconstruction quality: fraction of variance unexplained (and explained), streamed over batches."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, Metric

from .functional import _fvu_compute, _fvu_update


class FractionOfVarianceUnexplained(Metric):
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over every sample seen.

    The total variance is accumulated from per-feature sums of ``x`` and the sum of ``||x||^2``
    (in float64), so batches and DDP ranks combine exactly.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, d_model: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_model = d_model
        f64 = dict(dtype=torch.float64)
        self.add_state("sum_squared_error", default=torch.tensor(0.0, **f64), dist_reduce_fx="sum")
        self.add_state("sum_x", default=torch.zeros(d_model, **f64), dist_reduce_fx="sum")
        self.add_state("sum_squared_x", default=torch.tensor(0.0, **f64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, **f64), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects x_hat and x of shape (n, {self.d_model}), "
                             f"got {tuple(x_hat.shape)} and {tuple(x.shape)}")
        sum_squared_error, sum_x, sum_squared_x, n = _fvu_update(x_hat, x)
        self.sum_squared_error += sum_squared_error
        self.sum_x += sum_x
        self.sum_squared_x += sum_squared_x
        self.n += n

    def compute(self) -> Tensor:
        return _fvu_compute(self.sum_squared_error, self.sum_x, self.sum_squared_x, self.n)


class FractionOfVarianceExplained(FractionOfVarianceUnexplained):
    """``1 - FVU``: the share of the inputs' total variance the reconstruction explains."""

    higher_is_better = True

    def compute(self) -> Tensor:
        return 1 - super().compute()


#: Element-wise mean squared reconstruction error (the paper's MSE term); torchmetrics' own.
ReconstructionMSE = MeanSquaredError

__all__ = ["FractionOfVarianceUnexplained", "FractionOfVarianceExplained", "ReconstructionMSE"]
