"""Proximal-gradient solvers: ISTA and FISTA with the non-negative soft threshold, and support refinement."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import require_at_least
from .iterative import IterativeHead, WarmStart, gram_product, gram_product_flops, keep_topk, lipschitz_constant
from .registry import register_encoder


@register_encoder("ista")
class ISTAEncoder(IterativeHead):
    """ISTA: proximal gradient with the non-negative soft threshold and step 1/L.

    ``s <- ReLU(s - grad f_smooth(s) / L - l1 / (N L))``, ``L`` from the dictionary's spectral norm;
    ``k`` projects every iterate onto its ``k`` largest entries. Stops early once no code moves by
    more than ``tol`` (checked every ``check_every`` iterations)."""

    accelerated = False
    example_kwargs = {"steps": 20}

    def __init__(self, d_model: int, n_latents: int, steps: int = 300, tol: float = 0.0, check_every: int = 10,
                 l1_coeff: float = 0.01, warm_start: WarmStart = None, k: int | None = None) -> None:
        super().__init__(d_model, n_latents, l1_coeff=l1_coeff, warm_start=warm_start, k=k)
        require_at_least(self.name, 1, steps=steps, check_every=check_every)
        require_at_least(self.name, 0, tol=tol)
        self.steps, self.tol, self.check_every = int(steps), float(tol), int(check_every)

    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        return self.proximal_gradient(x, atoms, init)

    def solver_flops(self) -> float:
        # x D^T once; per iteration s (D D^T), gradient and step (4N), threshold (2N), momentum (4N)
        m, n = self.d_model, self.n_latents
        per_iteration = gram_product_flops(n, m) + 6 * n + (4 * n if self.accelerated else 0)
        return 2 * m * n + self.iterations * per_iteration

    def proximal_gradient(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        # f_smooth(s) = ||s D - x||^2 / M has gradient (2/M)(s D - x) D^T and Lipschitz constant (2/M) ||D||_2^2
        lipschitz = 2.0 / self.d_model * lipschitz_constant(atoms)
        step, threshold = 1.0 / lipschitz, self.l1_coeff / self.n_latents / lipschitz
        codes = torch.zeros(x.shape[0], self.n_latents, dtype=x.dtype, device=x.device) if init is None else init.clone()
        momentum_point, t = codes, 1.0
        # step * gradient = scale * s (D D^T) - scale * x D^T, one fused product per iteration; the
        # element-wise work runs in place (at LLM widths it is a (batch x n_latents) pass each)
        scale = step * 2.0 / self.d_model
        scaled_xdt, times_gram = (x @ atoms.T).mul_(scale), gram_product(atoms)
        for iteration in range(1, self.steps + 1):
            step_grad = times_gram(momentum_point, scaled_xdt, scale)
            new = keep_topk(torch.sub(momentum_point, step_grad, out=step_grad).sub_(threshold).clamp_min_(0), self.k)
            if self.accelerated:
                t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
                momentum = (t - 1) / t_next
                momentum_point = new.mul(1 + momentum).sub_(codes, alpha=momentum)  # new + momentum (new - codes)
                t = t_next
            else:
                momentum_point = new
            done = self.tol > 0 and iteration % self.check_every == 0 and (new - codes).abs().max().item() < self.tol
            codes = new
            if done:
                return codes, iteration
        return codes, self.steps


MAX_REFINE_LATENTS = 1024


@register_encoder("fista")
class FISTAEncoder(ISTAEncoder):
    """FISTA: ISTA with Nesterov momentum (Beck & Teboulle, 2009), with optional support refinement.

    ``refine_rounds > 0`` follows the solve with a least-squares debiasing of the support: fit ``x``
    by least squares on the atoms FISTA kept (at most ``refine_max_support``); while the relative
    residual exceeds ``refine_tol``, add the atom most correlated with the residual and refit, for
    at most ``refine_rounds`` additions. This removes the L1 shrinkage (and recovers small codes
    the threshold zeroed), which caps MCC below 1 on exactly sparse data. A sample whose fit never
    reaches the tolerance keeps its FISTA codes.
    """

    accelerated = True
    example_kwargs = {"steps": 20}

    def __init__(self, d_model: int, n_latents: int, steps: int = 300, tol: float = 0.0, check_every: int = 10,
                 l1_coeff: float = 0.01, warm_start: WarmStart = None, k: int | None = None,
                 refine_rounds: int = 0, refine_max_support: int | None = None, refine_tol: float = 1e-6) -> None:
        super().__init__(d_model, n_latents, steps=steps, tol=tol, check_every=check_every, l1_coeff=l1_coeff,
                         warm_start=warm_start, k=k)
        require_at_least("fista", 0, refine_rounds=refine_rounds, refine_tol=refine_tol)
        self.refine_rounds, self.refine_tol = int(refine_rounds), float(refine_tol)
        if self.refine_rounds and n_latents > MAX_REFINE_LATENTS:
            raise ValueError(f"fista: support refinement solves an N x N system per sample; it is meant for small "
                             f"dictionaries (n_latents <= {MAX_REFINE_LATENTS}), got n_latents={n_latents}")
        self.refine_max_support = int(refine_max_support or max(1, d_model // 2))
        if not 1 <= self.refine_max_support <= d_model:
            raise ValueError(f"fista: need 1 <= refine_max_support <= d_model ({d_model}), got {refine_max_support}")

    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        codes, iterations = self.proximal_gradient(x, atoms, init)
        if self.refine_rounds:
            codes = refine_support(codes, x, atoms, self.refine_max_support, self.refine_tol, self.refine_rounds)
        return codes, iterations

    def solver_flops(self) -> float:
        m, n = self.d_model, self.n_latents
        # per round: masked system (3N^2 + N), LU solve (2N^3/3 + 2N^2), residual and scores (4MN + 3M)
        per_round = 2 * n**3 / 3 + 5 * n * n + 4 * m * n + 3 * m + n
        return super().solver_flops() + (self.refine_rounds + 1 if self.refine_rounds else 0) * per_round


def refine_support(codes: Tensor, x: Tensor, atoms: Tensor, max_support: int, tol: float, rounds: int) -> Tensor:
    """Least-squares refit of each sample on its support, growing the support greedily from the
    residual (see :class:`FISTAEncoder`). Supports are masks, so all samples solve at once."""
    n_latents = atoms.shape[0]
    gram, xdt = atoms @ atoms.T, x @ atoms.T
    energy = x.square().sum(-1).clamp_min(1e-30)
    support = keep_topk(codes, max(1, max_support - rounds)) > 0
    eye = torch.eye(n_latents, dtype=x.dtype, device=x.device)
    for round_ in range(rounds + 1):
        mask = support.to(x.dtype)
        # the masked normal equations: off-support codes are pinned to zero by the identity rows
        system = gram * mask[:, :, None] * mask[:, None, :] + torch.diag_embed(1 - mask) + 1e-10 * eye
        fit = torch.linalg.solve(system, (xdt * mask).unsqueeze(-1)).squeeze(-1)
        residual = x - fit @ atoms
        converged = (residual.square().sum(-1) / energy < tol) & (fit >= -1e-6).all(-1)
        growable = ~converged & (support.sum(-1) < max_support)
        if round_ == rounds or not growable.any():
            break
        score = (residual @ atoms.T).abs().masked_fill(support, -1.0)
        rows = growable.nonzero().squeeze(-1)
        support[rows, score[rows].argmax(-1)] = True
    return torch.where(converged[:, None], fit.clamp_min(0), codes)
