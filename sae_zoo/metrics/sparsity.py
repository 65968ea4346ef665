"""Sparsity of the codes: L0, L1 and dead latents, streamed over batches."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from .functional import _dead_latents_compute, _dead_latents_update, _l0_update, _l1_update, _per_sample_mean_compute


class _PerSampleMean(Metric):
    """Mean over samples of a per-sample quantity, streamed as a summed total and a sample count;
    ``_update(*update's arguments) -> (total, n)`` is the subclass's functional update helper."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _update: Callable[..., tuple[Tensor, Tensor]]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, *args: Tensor) -> None:
        total, n = type(self)._update(*args)
        self.total += total
        self.n += n

    def compute(self) -> Tensor:
        return _per_sample_mean_compute(self.total, self.n)


class L0(_PerSampleMean):
    """Mean number of non-zero latents per sample."""

    _update = staticmethod(_l0_update)


class L1(_PerSampleMean):
    """Mean L1 norm of the codes per sample."""

    _update = staticmethod(_l1_update)


class DeadLatents(Metric):
    """Fraction of the ``num_latents`` latents that were zero on every sample seen since the last reset."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_latents: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_latents = num_latents
        self.add_state("fire_count", default=torch.zeros(num_latents, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        if codes.shape[-1] != self.num_latents:
            raise ValueError(f"DeadLatents expects codes of width {self.num_latents}, got {tuple(codes.shape)}")
        self.fire_count += _dead_latents_update(codes)

    def compute(self) -> Tensor:
        return _dead_latents_compute(self.fire_count)


__all__ = ["L0", "L1", "DeadLatents"]
