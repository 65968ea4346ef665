"""Iterative hard thresholding: amortised codes refined against the dictionary, keeping the encoder's
own notion of "active"."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TrainingCodes, require_at_least
from .iterative import IterativeHead, WarmStart, gram_product, gram_product_flops, keep_topk, lipschitz_constant
from .registry import register_encoder


@register_encoder("iht")
class IHTEncoder(IterativeHead):
    """``s <- H(s + (step_size / L) (x - s D) D^T)`` for ``steps`` iterations, with the non-negative hard
    threshold ``H(z) = z [z > threshold]`` and ``L`` the dictionary's squared spectral norm (Blumensath &
    Davies, 2009).

    Warm-started by an amortised head (its eval-mode codes are the first iterate), each step lets the
    active latents explain the input jointly, so a latent that only echoes another feature's direction
    drops below the threshold and a feature the encoder missed can rise above it. ``threshold=None`` takes
    the warm-start head's learned threshold (BatchTopK's or JumpReLU's), times ``threshold_scale``: the
    same bar for "active" the encoder was trained with, so L0 stays near the encoder's. Unlike a
    soft threshold (ISTA, FISTA) it does not shrink the codes that stay.

    ``refine_in_training=True`` trains the dictionary on refined codes (the paper's sparse coding, made
    practical by the amortised start): each training batch is refined from the warm-start head's codes
    with the current dictionary, the model's loss reconstructs from the refined codes (so the dictionary
    learns from them), and the warm-start head learns to propose them through its own reconstruction
    (``aux_loss``, through a frozen copy of the decoder). ``k`` then also caps each training sample.
    """

    example_kwargs: dict[str, Any] = {"steps": 10, "threshold": 0.05}

    def __init__(self, d_model: int, n_latents: int, steps: int = 30, threshold: float | None = None,
                 threshold_scale: float = 1.0, step_size: float = 1.0, warm_start: WarmStart = None,
                 k: int | None = None, refine_in_training: bool = False) -> None:
        super().__init__(d_model, n_latents, l1_coeff=0.0, warm_start=warm_start, k=k)
        require_at_least("iht", 1, steps=steps)
        require_at_least("iht", 0, threshold=threshold, threshold_scale=threshold_scale)
        if not 0 < step_size < 2:
            raise ValueError(f"iht needs 0 < step_size < 2 (in units of 1/L), got step_size={step_size!r}")
        if threshold is None and not isinstance(getattr(self.warm_start, "threshold", None), Tensor):
            raise ValueError("iht needs threshold=..., or a warm_start head with a learned threshold (batchtopk, "
                             "jumprelu) to take it from")
        self.steps, self.threshold, self.threshold_scale = int(steps), threshold, float(threshold_scale)
        self.step_size = float(step_size)
        if refine_in_training and self.warm_start is None:
            raise ValueError("iht: refine_in_training=True refines the warm-start head's codes in training; give "
                             "warm_start=...")
        if refine_in_training and not any(p.requires_grad for p in self.warm_start.parameters()):
            raise ValueError("iht: refine_in_training=True trains the warm-start head beside the dictionary, but "
                             "this warm start is frozen (a trained head used as it is); drop refine_in_training")
        self.refine_in_training = bool(refine_in_training)

    def training_codes(self, x: Tensor, dictionary: nn.Module | None = None, sparse: bool = True) -> TrainingCodes:
        if not (self.refine_in_training and self.training):
            return super().training_codes(x, dictionary, sparse)
        if dictionary is None:
            raise ValueError("iht refines against the dictionary: training_codes(x, dictionary)")
        warm = self.warm_start.training_codes(x, dictionary, sparse=False)
        x = self.check_input(x, dictionary)
        bias = dictionary.bias.detach() if getattr(dictionary, "bias", None) is not None else None
        flat = x.detach().reshape(-1, self.d_model)
        with torch.no_grad():
            start = warm.codes.detach().reshape(-1, self.n_latents)
            codes, self.last_iterations = self.solve(flat if bias is None else flat - bias,
                                                     dictionary.atoms.detach(), start)
            codes = keep_topk(codes, self.k).reshape(*x.shape[:-1], self.n_latents)
        proposal = warm.codes @ dictionary.atoms.detach()
        aux = F.mse_loss(proposal if bias is None else proposal + bias, x.to(proposal.dtype))
        return TrainingCodes(codes, aux_loss=aux if warm.aux_loss is None else aux + warm.aux_loss)

    def hard_threshold(self) -> Tensor | float:
        """The bar a code must pass: the given threshold, or the warm-start head's (per latent or one value)."""
        base = self.threshold if self.threshold is not None else self.warm_start.threshold.detach().clamp_min(0)
        return base * self.threshold_scale

    def solve(self, x: Tensor, atoms: Tensor, init: Tensor | None) -> tuple[Tensor, int]:
        step = self.step_size / lipschitz_constant(atoms)
        threshold = self.hard_threshold()
        codes = init.clone() if init is not None else torch.zeros(x.shape[0], self.n_latents, dtype=x.dtype,
                                                                   device=x.device)
        # step * gradient of ||s D - x||^2 / 2 = step * s (D D^T) - step * x D^T, one fused product per iteration
        scaled_xdt, times_gram = (x @ atoms.T).mul_(step), gram_product(atoms)
        for _ in range(self.steps):
            z = codes - times_gram(codes, scaled_xdt, float(step))
            codes = z * (z > threshold)
        return codes, self.steps

    def solver_flops(self) -> float:
        # x D^T once; per iteration s (D D^T), the step (2N) and the threshold (2N)
        return 2 * self.d_model * self.n_latents + self.iterations * (
            gram_product_flops(self.n_latents, self.d_model) + 4 * self.n_latents)
