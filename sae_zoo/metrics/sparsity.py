"""Sparsity of the codes: L0, L1 and dead latents, streamed over batches."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _samples(codes: Tensor) -> Tensor:
    return codes.detach().reshape(-1, codes.shape[-1])


class _PerSampleMean(Metric):
    """Mean over samples of ``per_sample(codes)``, streamed as a summed total and a sample count."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def per_sample(codes: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, codes: Tensor) -> None:
        codes = _samples(codes)
        self.total += self.per_sample(codes).double().sum()
        self.n += codes.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.n


class L0(_PerSampleMean):
    """Mean number of non-zero latents per sample."""

    @staticmethod
    def per_sample(codes: Tensor) -> Tensor:
        return (codes != 0).sum(-1)


class L1(_PerSampleMean):
    """Mean L1 norm of the codes per sample."""

    @staticmethod
    def per_sample(codes: Tensor) -> Tensor:
        return codes.double().abs().sum(-1)


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
