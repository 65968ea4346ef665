"""The locally competitive algorithm (Rozell et al., 2008)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import require_at_least
from .iterative import IterativeHead, WarmStart, gram_product, gram_product_flops, lipschitz_constant
from .registry import register_encoder


@register_encoder("lca")
class LCAEncoder(IterativeHead):
    """The locally competitive algorithm: thresholded leaky integrators with lateral inhibition.

    ``u <- u + eta (x D^T - u - a (D D^T - I))``,
    ``a = ReLU(u - threshold)``. Its fixed points minimise ``0.5 ||s D - x||^2 + threshold ||s||_1``,
    the paper's objective with ``threshold = l1_coeff * M / (2 N)``. ``eta`` defaults to ``1/L``."""

    example_kwargs = {"steps": 20}

    def __init__(self, d_model: int, n_latents: int, steps: int = 300, eta: float | None = None, tol: float = 0.0,
                 check_every: int = 10, l1_coeff: float = 0.01, warm_start: WarmStart = None,
                 k: int | None = None) -> None:
        super().__init__(d_model, n_latents, l1_coeff=l1_coeff, warm_start=warm_start, k=k)
        require_at_least("lca", 1, steps=steps, check_every=check_every)
        require_at_least("lca", 0, tol=tol)
        if eta is not None and eta <= 0:
            raise ValueError(f"lca needs eta > 0 (or None for 1/L), got eta={eta!r}")
        self.steps, self.eta, self.tol, self.check_every = int(steps), eta, float(tol), int(check_every)

    def solver_flops(self) -> float:
        # x D^T once; per step a D D^T, the update (5N), the threshold (2N)
        m, n = self.d_model, self.n_latents
        return 2 * m * n + self.iterations * (gram_product_flops(n, m) + 7 * n)

    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        threshold = self.l1_coeff * self.d_model / (2 * self.n_latents)
        eta = self.eta if self.eta is not None else 1.0 / lipschitz_constant(atoms).item()
        drive, times_gram = x @ atoms.T, gram_product(atoms)
        u = torch.zeros_like(drive) if init is None else init + threshold * (init > 0)
        codes = torch.relu(u - threshold)
        for iteration in range(1, self.steps + 1):
            u = u + eta * (drive - u - times_gram(codes) + codes)
            new = torch.relu(u - threshold)
            done = self.tol > 0 and iteration % self.check_every == 0 and (new - codes).abs().max().item() < self.tol
            codes = new
            if done:
                return codes, iteration
        return codes, self.steps
