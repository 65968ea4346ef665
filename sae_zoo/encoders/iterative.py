"""Shared machinery of the iterative heads: inference by optimising the codes against the dictionary.

Every iterative head minimises the paper's per-sample objective

    f(s) = ||s D - x||^2 / M  +  l1_coeff * ||s||_1 / N,    s >= 0,

(the paper's loss, ``MSE + l1_coeff * mean|s|``, for one sample), with the dictionary ``D`` held
fixed. The solvers run without autograd, so they work inside ``torch.no_grad``/``inference_mode``,
and treat every sample independently, so a sample's codes do not depend on its batch.

A head may take a ``warm_start`` head (any registered head, given as its config dict). In training
mode the warm-start head's own codes are returned, so it trains with the model's loss like any
amortised head; in eval mode they seed the solver (amortised proposal, then iterative refinement:
the paper's "SAE+ITO").
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .base import EncoderHead, require_at_least
from .registry import create_encoder


def lipschitz_constant(atoms: Tensor) -> Tensor:
    """Largest eigenvalue of ``D D^T`` (squared spectral norm of the dictionary)."""
    return torch.linalg.matrix_norm(atoms.detach().double(), ord=2).square().to(atoms.dtype)


def gram_product(atoms: Tensor) -> Callable[..., Tensor]:
    """``s -> s (D D^T)``, or ``alpha s (D D^T) - minus`` fused into one product, the way that costs
    less: through the N x N Gram matrix when ``N < 2M``, else as ``(s D) D^T`` (at LLM widths the Gram
    matrix would be far larger than the dictionary)."""
    gram = atoms @ atoms.T if gram_is_cheaper(*atoms.shape) else None

    def times_gram(s: Tensor, minus: Tensor | None = None, alpha: float = 1.0) -> Tensor:
        left, right = (s, gram) if gram is not None else (s @ atoms, atoms.T)
        if minus is None:
            return left @ right
        return torch.addmm(minus, left, right, beta=-1, alpha=alpha)

    return times_gram


def gram_is_cheaper(n_latents: int, d_model: int) -> bool:
    return n_latents < 2 * d_model


def gram_product_flops(n_latents: int, d_model: int) -> int:
    """FLOPs of one :func:`gram_product` per sample."""
    return 2 * n_latents * n_latents if gram_is_cheaper(n_latents, d_model) else 4 * n_latents * d_model


def keep_topk(codes: Tensor, k: int | None) -> Tensor:
    """Zero all but the ``k`` largest entries of each row (no-op when ``k`` is None)."""
    if k is None or k >= codes.shape[-1]:
        return codes
    values, indices = codes.topk(k, dim=-1)
    return torch.zeros_like(codes).scatter(-1, indices, values)


#: what a recipe or config may give as a warm start: a head's config, or a trained head
WarmStart = Optional[Union[dict[str, Any], EncoderHead]]


class IterativeHead(EncoderHead):
    """Base of the heads that solve for the codes. Subclasses implement :meth:`solve` and :meth:`solver_flops`."""

    reads_dictionary = True  # they solve for codes that reconstruct the input

    def __init__(self, d_model: int, n_latents: int, l1_coeff: float = 0.01, warm_start: WarmStart = None,
                 k: int | None = None) -> None:
        super().__init__(d_model, n_latents)
        require_at_least(type(self).name, 0, l1_coeff=l1_coeff)
        require_at_least(type(self).name, 1, k=k)
        if k is not None and k > n_latents:
            raise ValueError(f"{type(self).name}: need k <= n_latents ({n_latents}), got k={k}")
        self.l1_coeff, self.k = float(l1_coeff), k
        if isinstance(warm_start, EncoderHead):  # a trained head, e.g. a pretrained SAE's own encoder
            if (warm_start.d_model, warm_start.n_latents) != (d_model, n_latents):
                raise ValueError(f"{type(self).__name__}: warm_start head maps {warm_start.d_model} -> "
                                 f"{warm_start.n_latents}, expected {d_model} -> {n_latents}")
            self.warm_start = warm_start
            self._init_args["warm_start"] = warm_start.config()  # config() stays JSON; weights travel in the state
        else:
            self.warm_start = (create_encoder(**{**warm_start, "d_model": d_model, "n_latents": n_latents})
                               if warm_start else None)
        #: Iterations the last call ran (early stopping may end a solve before its step budget).
        self.last_iterations = 0

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        if dictionary is None:
            raise ValueError(f"{self.name} is an iterative head: forward(x, dictionary) needs the dictionary")
        x = self.check_input(x, dictionary)
        if x.numel() == 0:  # an empty batch has empty codes, as with every other head
            return x.new_zeros(*x.shape[:-1], self.n_latents)
        init = self.warm_start(x, dictionary) if self.warm_start is not None else None
        if self.training and init is not None:
            return init
        flat = x.detach().reshape(-1, self.d_model)
        if getattr(dictionary, "bias", None) is not None:
            flat = flat - dictionary.bias.detach()
        with torch.no_grad():
            start = None if init is None else init.detach().reshape(-1, self.n_latents)
            codes, self.last_iterations = self.solve(flat, dictionary.atoms.detach(), start)
        return keep_topk(codes, self.k).reshape(*x.shape[:-1], self.n_latents)

    def trained_part(self) -> EncoderHead | None:
        """What trains when the model trains: the warm-start head, if any (the solver has no weights)."""
        return self.warm_start

    @property
    def iterations(self) -> int:
        """Iterations to count: those the last call ran, or the full budget before any call."""
        return self.last_iterations or getattr(self, "steps", 1)

    @abstractmethod
    def solver_flops(self) -> float:
        """FLOPs of the solve for one sample, the final decode excluded (see :mod:`sae_zoo.flops`)."""

    def encode_flops(self) -> tuple[float, float]:
        """The warm start's encoding, then the solve (counted as matmul FLOPs)."""
        matmul, elementwise = self.warm_start.encode_flops() if self.warm_start is not None else (0, 0)
        return matmul + self.solver_flops(), elementwise

    @abstractmethod
    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        """Codes ``(B, N)`` for inputs ``x`` ``(B, M)`` and atoms ``(N, M)``; returns ``(codes, iterations)``."""

    def objective(self, codes: Tensor, x: Tensor, atoms: Tensor) -> Tensor:
        """The per-sample objective f(s), shape ``(B,)``."""
        return (codes @ atoms - x).square().mean(-1) + self.l1_coeff * codes.abs().mean(-1)
