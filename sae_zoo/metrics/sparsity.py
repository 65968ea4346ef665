"""Sparsity of the codes: L0, L1 and dead latents, streamed over batches."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _samples(codes: Tensor) -> Tensor:
    return codes.detach().reshape(-1, codes.shape[-1])


class L0(Metric):
    """Mean number of non-zero latents per sample."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("active", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        codes = _samples(codes)
        self.active += (codes != 0).sum()
        self.n += codes.shape[0]

    def compute(self) -> Tensor:
        return self.active / self.n


class L1(Metric):
    """Mean L1 norm of the codes per sample."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        codes = _samples(codes)
        self.total += codes.double().abs().sum()
        self.n += codes.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.n


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
        codes = _samples(codes)
        if codes.shape[1] != self.num_latents:
            raise ValueError(f"DeadLatents expects codes of width {self.num_latents}, got {tuple(codes.shape)}")
        self.fire_count += (codes != 0).sum(0)

    def compute(self) -> Tensor:
        return (self.fire_count == 0).double().mean()


__all__ = ["L0", "L1", "DeadLatents"]
