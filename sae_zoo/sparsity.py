"""How a run's sparsity coefficient moves: fixed, warmed up, or tuned until the L0 is a target.

``SparseCoder``'s loss is ``MSE + coeff * sparsity``. :class:`SparsityControl` owns ``coeff``. With a
``target_l0``, a run of a head with firing thresholds (:meth:`EncoderHead.firing_margins`: the linear SAE,
JumpReLU, gated, the residual MLP) also starts at that L0 and ends on it:

1. **Start** (:func:`start_at_l0`): before the first step, one shift of every threshold puts the head's codes
   of a training sample at ``l0_start_factor * target`` active latents (the head's; JumpReLU starts denser).
   A controller that starts near where it settles does not wind up.
2. **Train**: a proportional-integral controller in log space tunes ``coeff`` after every batch.
3. **End** (:func:`calibrate_l0`): one shift of every threshold lands the training sample's L0 on the
   target, correcting what the controller's lag leaves (``SparseCoder.l0_calibration`` records the L0 before
   and the shift), so that methods compare at equal L0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .encoders import EncoderHead
from .schedules import schedule_steps, steps_or_fraction


def l0_shift(margins: Tensor, l0: float) -> Tensor:
    """The one shift of every threshold after which ``margins`` ``(..., n_latents)`` give ``l0`` active latents
    per row on average: halfway between the ``round(l0 * rows)``-th largest margin and the next. The latents
    keep their relative thresholds."""
    z = margins.detach().reshape(-1).float()
    count = min(max(1, round(l0 * z.numel() / margins.shape[-1])), z.numel() - 1)
    return z.topk(count + 1).values[-2:].mean()


@torch.no_grad()
def start_at_l0(head: EncoderHead, x: Tensor, dictionary: nn.Module, l0: float) -> bool:
    """Shift ``head``'s thresholds so that its codes of ``x`` average ``head.l0_start_factor * l0`` active
    latents. Returns False (and changes nothing) for a head without firing thresholds."""
    margins = head.firing_margins(x, dictionary)
    if margins is None:
        return False
    head.shift_thresholds(l0_shift(margins, head.l0_start_factor * l0))
    return True


@torch.no_grad()
def calibrate_l0(head: EncoderHead, x: Tensor, dictionary: nn.Module, l0: float) -> dict[str, float] | None:
    """One shift of all of ``head``'s thresholds after which its codes of ``x`` average ``l0`` active latents.
    Returns ``{"l0_before", "l0_after", "shift"}``, or None for a head without firing thresholds."""
    margins = head.firing_margins(x, dictionary)
    if margins is None:
        return None
    before = float((margins > 0).sum(-1).float().mean())
    shift = l0_shift(margins, l0)
    head.shift_thresholds(shift)
    after = float((head.firing_margins(x, dictionary) > 0).sum(-1).float().mean())
    return {"l0_before": before, "l0_after": after, "shift": float(shift)}


class SparsityControl(nn.Module):
    """The sparsity coefficient over a run: ``coeff``, ramped up linearly over ``warmup_steps``, and with
    ``target_l0`` tuned after every training batch by a proportional-integral controller in log space::

        e = clip((L0 - target) / target, -1, 1);   I += rate * e;   log coeff = I + GAIN * e

    The integral settles where the batches' L0 averages the target; the proportional part answers the batch
    at once, which damps the swings that the lag between a coefficient and the L0 it causes would build."""

    #: the proportional gain: an L0 twice the target multiplies the coefficient by e at once
    GAIN = 1.0

    def __init__(self, coeff: float, target_l0: float | None = None, rate: float = 0.02,
                 warmup_steps: int | float = 0) -> None:
        super().__init__()
        if target_l0 is not None and not coeff > 0:
            raise ValueError("target_l0 tunes the sparsity coefficient multiplicatively, so it needs a starting "
                             f"l1_coeff > 0, got l1_coeff={coeff!r}")
        self.target_l0, self.rate = target_l0, float(rate)
        self.warmup_steps = steps_or_fraction(warmup_steps, "sparsity_warmup_steps")
        # tensors, so that tuning costs no synchronisation; the checkpoint stores them (SparseCoder)
        self.register_buffer("coeff", torch.tensor(float(coeff)), persistent=False)
        self.register_buffer("integral", torch.tensor(math.log(coeff) if coeff > 0 else 0.0), persistent=False)

    @property
    def targets_l0(self) -> bool:
        return self.target_l0 is not None

    def value(self, step: int | None, total_steps: float | None = None) -> Tensor:
        """The coefficient at training step ``step`` of ``total_steps`` (None: outside training, no warm-up; the
        run's length is read only where the warm-up is a fraction of it)."""
        if self.warmup_steps and step is not None:
            warmup = schedule_steps(self.warmup_steps, total_steps, "sparsity_warmup_steps")
            if step < warmup:
                return self.coeff * ((step + 1) / warmup)
        return self.coeff.clone()  # update() changes the buffer in place before the backward pass

    @torch.no_grad()
    def update(self, l0: Tensor) -> None:
        """One step of the controller, after a training batch of L0 ``l0``."""
        error = ((l0 - self.target_l0) / self.target_l0).clamp(-1, 1)
        self.integral.add_(self.rate * error)
        self.coeff.copy_(torch.exp(self.integral + self.GAIN * error))

    def restore(self, coeff: float, integral: float | None = None) -> None:
        """Resume from a checkpoint's coefficient (and integral; older checkpoints have none)."""
        self.coeff.fill_(coeff)
        self.integral.fill_(integral if integral is not None else math.log(coeff) if coeff > 0 else 0.0)
