"""Exhaustive support search: the sparsest exact non-negative fit, found by trying every small support."""

from __future__ import annotations

from itertools import combinations
from math import comb

import torch
from torch import Tensor

from .base import require_at_least
from .iterative import IterativeHead, WarmStart
from .registry import register_encoder


@register_encoder("support_search")
class SupportSearchEncoder(IterativeHead):
    """Exhaustive support search: the sparsest exact non-negative least-squares fit.

    Tries every support of at most ``max_support`` atoms and returns the least-squares codes on the
    smallest one that fits ``x`` with non-negative codes and relative residual below ``tol``
    (among supports of that size, the best fit). A sample no support fits gets the best
    non-negative fit of any size.

    On exactly sparse data with at most ``max_support`` active latents in general position (as the
    paper's synthetic data) this recovers the codes exactly, with no L1 shrinkage. Each support's
    Gram inverse is computed once per dictionary, so a sample costs about ``sum_k C(N, k) (2k^2 + 3k + 2)``
    FLOPs: cheap for small dictionaries, combinatorial for large ones (refused above ``max_subsets``).
    Computes in float64.
    """

    def __init__(self, d_model: int, n_latents: int, max_support: int = 3, tol: float = 1e-8,
                 max_subsets: int = 1_000_000, chunk_size: int = 256, l1_coeff: float = 0.01,
                 warm_start: WarmStart = None) -> None:
        super().__init__(d_model, n_latents, l1_coeff=l1_coeff, warm_start=warm_start)
        require_at_least("support_search", 1, chunk_size=chunk_size)
        require_at_least("support_search", 0, tol=tol)
        if not 1 <= max_support <= min(d_model, n_latents):
            raise ValueError(f"support_search needs 1 <= max_support <= min(d_model, n_latents), got {max_support}")
        n_subsets = sum(comb(n_latents, k) for k in range(1, max_support + 1))
        if n_subsets > max_subsets:
            raise ValueError(f"support_search: {n_subsets} supports of size <= {max_support} among {n_latents} latents "
                             f"exceed max_subsets={max_subsets}; lower max_support")
        self.max_support, self.tol, self.chunk_size = int(max_support), float(tol), int(chunk_size)

    def solver_flops(self) -> float:
        # x D^T, then per support of size k: coefficients (2k^2), residual (2k + 2), sign check (k);
        # the Gram inverses depend only on the dictionary and are not counted per sample
        m, n = self.d_model, self.n_latents
        per_sample = sum(comb(n, k) * (2 * k * k + 3 * k + 2) for k in range(1, self.max_support + 1))
        return 2 * m * n + per_sample

    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        atoms64, x64 = atoms.double(), x.double()
        gram = atoms64 @ atoms64.T
        supports = []
        for size in range(1, self.max_support + 1):
            subsets = torch.tensor(list(combinations(range(self.n_latents), size)), device=x.device)
            inverse = torch.linalg.pinv(gram[subsets[:, :, None], subsets[:, None, :]])
            supports.append((subsets, inverse))
        codes = torch.cat([self._fit(x64[i:i + self.chunk_size], atoms64, supports)
                           for i in range(0, x.shape[0], self.chunk_size)])
        return codes.to(x.dtype), 1

    def _fit(self, x: Tensor, atoms: Tensor, supports: list[tuple[Tensor, Tensor]]) -> Tensor:
        xdt = x @ atoms.T
        energy = x.square().sum(-1).clamp_min(1e-300)
        codes = torch.zeros_like(xdt)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        fallback_residual = torch.full_like(energy, float("inf"))
        fallback = codes.clone()
        for subsets, inverse in supports:
            rhs = xdt[:, subsets]  # (B, S, k)
            coeffs = torch.einsum("sij,bsj->bsi", inverse, rhs)
            # at the least-squares optimum ||x - c D_S||^2 = ||x||^2 - c . (D_S x)
            residual = ((energy[:, None] - (coeffs * rhs).sum(-1)) / energy[:, None]).clamp_min(0)
            feasible = (coeffs >= 0).all(-1)
            residual = torch.where(feasible, residual, torch.full_like(residual, float("inf")))
            best = residual.argmin(-1)
            best_residual = residual.gather(-1, best[:, None]).squeeze(-1)
            fitted = torch.zeros_like(codes).scatter(-1, subsets[best], coeffs[torch.arange(len(x)), best])
            accept = ~done & (best_residual < self.tol)
            codes[accept] = fitted[accept]
            done |= accept
            better = best_residual < fallback_residual
            fallback[better], fallback_residual[better] = fitted[better], best_residual[better]
        return torch.where(done[:, None], codes, fallback)
