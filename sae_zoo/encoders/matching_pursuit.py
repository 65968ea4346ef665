"""Matching pursuit: greedy inference that adds one atom per step (Mallat & Zhang, 1993), and OMP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import require_at_least
from .iterative import IterativeHead, WarmStart
from .registry import register_encoder


@register_encoder("mp")
class MatchingPursuitEncoder(IterativeHead):
    """``k`` greedy steps: pick the atom most correlated (positively) with the residual, give it the
    residual's projection on it, and subtract that from the residual. A sample stops early once its
    residual norm falls below ``residual_threshold``.

    ``orthogonal=True`` is OMP: after each pick, the codes of every chosen atom are refit by least
    squares, so the residual stays orthogonal to them. Codes are non-negative for plain MP; OMP's
    refit may give negative values. Like FISTA, it spends compute at inference instead of training.
    """

    example_kwargs: dict[str, Any] = {"k": 3}

    def __init__(self, d_model: int, n_latents: int, k: int = 32, orthogonal: bool = False,
                 residual_threshold: float = 0.0, warm_start: WarmStart = None) -> None:
        super().__init__(d_model, n_latents, warm_start=warm_start, k=k)
        require_at_least("mp", 0, residual_threshold=residual_threshold)
        self.orthogonal, self.residual_threshold = bool(orthogonal), float(residual_threshold)
        self.nonnegative_codes = not self.orthogonal

    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        codes = x.new_zeros(x.shape[0], self.n_latents) if init is None else init.clone()
        residual = x - codes @ atoms
        squared_norms = atoms.square().sum(-1)
        rows = torch.arange(x.shape[0], device=x.device)
        support = x.new_zeros(x.shape[0], 0, dtype=torch.long)
        for step in range(1, self.k + 1):
            correlation = (residual @ atoms.T).clamp_min_(0)
            best = correlation.argmax(-1)
            gain = correlation[rows, best]
            active = (residual.norm(dim=-1) > self.residual_threshold) & (gain > 0)
            value = torch.where(active, gain / squared_norms[best], 0)
            if self.orthogonal:
                support = torch.cat([support, best[:, None]], dim=1)
                chosen = atoms[support]                               # (B, t, d)
                fit = torch.linalg.lstsq(chosen.transpose(1, 2), x[..., None]).solution[..., 0]
                fit = torch.where(active[:, None], fit, codes.gather(1, support))  # a finished sample keeps its codes
                codes = codes.scatter(1, support, fit)
                residual = x - codes @ atoms
            else:
                codes[rows, best] += value
                residual -= value[:, None] * atoms[best]
            if not active.any():
                return codes, step
        return codes, self.k

    @property
    def steps(self) -> int:
        return self.k

    def solver_flops(self) -> float:
        # per step: the correlations (2MN), the argmax (N) and the update of one code and the residual (3M);
        # OMP's refit of t atoms is about 2Mt^2 (normal equations)
        m, n, steps = self.d_model, self.n_latents, self.iterations
        refit = sum(2 * m * t * t for t in range(1, steps + 1)) if self.orthogonal else 0
        return steps * (2 * m * n + n + 3 * m) + refit
