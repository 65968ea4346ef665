"""JumpReLU SAE encoder (Rajamanoharan et al. 2024): a ReLU that only fires above a learned threshold."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead, SparseCodes, TrainingCodes, kept_where_positive
from .interop import ForeignSAE
from .linear import LinearPreActivations, linear_export, load_linear
from .registry import register_encoder
from .sparse_linear import DensityRecord, linear_grads_at, padded_entries


class JumpReLUFunction(torch.autograd.Function):
    """``(z * (z > threshold), mean(z > threshold))``: the codes and their L0 penalty (the mean of the step
    over samples and latents). The codes' gradient to ``z`` is the step's; the threshold's gradient, from
    both outputs, is the straight-through estimator with a rectangle kernel of width ``bandwidth``
    (Rajamanoharan et al. 2024; SAELens's ``JumpReLU`` and ``Step``).

    Writing a fresh ``(batch, n_latents)`` float tensor is what costs on a CPU, so the step writes one (the
    gradient to ``z``; the codes overwrite ``z``) and keeps, instead of ``z``, the codes (which the decoder keeps
    anyway; with ``threshold >= 0``, as the head keeps it, a latent fires where its code is > 0) and
    where ``z`` is within the kernel (``|z - threshold| < bandwidth / 2``, a few percent of the entries),
    whose terms are summed per latent from their indices."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        # two boolean (batch, n_latents) tensors in all: the second holds the band's upper side, then the step
        near = z > threshold - bandwidth / 2
        fires = torch.lt(z, threshold + bandwidth / 2)
        near &= fires
        fires = torch.gt(z, threshold, out=fires)
        codes = torch.where(fires, z, z.new_zeros(()), out=z)  # in z's place: nothing else reads it
        ctx.mark_dirty(z)
        ctx.save_for_backward(threshold, codes, near)
        ctx.bandwidth = bandwidth
        return codes, fires.count_nonzero().to(torch.float32) / fires.numel()

    @staticmethod
    def backward(ctx, grad_codes: Tensor, grad_l0: Tensor) -> tuple[Tensor, Tensor, None]:
        threshold, codes, near = ctx.saved_tensors
        n_latents = threshold.shape[-1]
        near, grad_codes = near.reshape(-1, n_latents), grad_codes.reshape(-1, n_latents)
        rows, latents = near.nonzero(as_tuple=True)
        summed = torch.zeros(n_latents, dtype=torch.float32, device=threshold.device)
        summed.index_add_(0, latents, grad_codes[rows, latents].to(torch.float32))
        count = torch.bincount(latents, minlength=n_latents).to(torch.float32)
        # d codes / d threshold = -threshold * kernel; d mean(step) / d threshold = -kernel / numel
        grad_threshold = -(threshold * summed + count * (grad_l0 / codes.numel())) / ctx.bandwidth
        grad_z = kept_where_positive(grad_codes.reshape(codes.shape), codes)
        return grad_z, grad_threshold.to(threshold.dtype), None


class SparseJumpReLULinear(torch.autograd.Function):
    """:class:`JumpReLUFunction` of ``z = x W^T + b``, as each sample's entries that fire or lie within the
    kernel (``(values, indices, l0)``, padded: :func:`~sae_zoo.encoders.sparse_linear.padded_entries`; the
    kernel's entries that do not fire have value 0, and are listed so that the decoder's backward gives their
    gradient, which the threshold's estimator needs). The same gradients as the dense way, from products over
    the entries instead of dense ones (:func:`~sae_zoo.encoders.sparse_linear.linear_grads_at`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, threshold: Tensor, bandwidth: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        z = F.linear(x, weight, bias)
        flat = z.reshape(-1, z.shape[-1])
        fires = flat > threshold
        listed = flat > threshold - bandwidth / 2
        listed &= torch.lt(flat, threshold + bandwidth / 2)
        listed |= fires
        indices, real, (values,) = padded_entries(listed, flat)
        at = threshold[indices]
        near = real & (values > at - bandwidth / 2) & (values < at + bandwidth / 2)
        values = values * (values > at)  # the padding (0 at latent 0) never fires: thresholds are >= 0
        ctx.save_for_backward(x, weight, threshold, indices, values, near)
        ctx.bandwidth, ctx.numel = bandwidth, flat.numel()
        ctx.mark_non_differentiable(indices)
        l0 = fires.count_nonzero().to(torch.float32) / fires.numel()
        shape = (*z.shape[:-1], indices.shape[-1])
        return values.reshape(shape), indices.reshape(shape), l0

    @staticmethod
    def backward(ctx, grad_values: Tensor, grad_indices: Tensor, grad_l0: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, threshold, indices, values, near = ctx.saved_tensors
        grad_values = grad_values.reshape(values.shape)
        latents = indices[near]
        summed = torch.zeros(threshold.shape[-1], dtype=torch.float32, device=threshold.device)
        summed.index_add_(0, latents, grad_values[near].to(torch.float32))
        count = torch.bincount(latents, minlength=threshold.shape[-1]).to(torch.float32)
        grad_threshold = -(threshold * summed + count * (grad_l0 / ctx.numel)) / ctx.bandwidth
        grad_z = kept_where_positive(grad_values, values)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return (*linear_grads_at(x, weight, indices, grad_z, needs), grad_threshold.to(threshold.dtype), None)


@register_encoder("jumprelu")
class JumpReLUEncoder(DensityRecord, LinearPreActivations, EncoderHead):
    """``codes = ReLU(z) * (z > threshold)`` with ``z = W x + b`` and one learned threshold per latent.

    Trained as in Rajamanoharan et al. (2024) and SAELens: the threshold learns through a
    straight-through estimator (rectangle kernel of width ``bandwidth``), and the sparsity penalty is
    the L0 itself (``sparsity_loss="step"``), or Anthropic's ``tanh(tanh_scale * code)`` (``"tanh"``).
    The model's ``l1_coeff`` weighs that penalty, a mean over samples and latents (L0 / n_latents).
    The threshold is kept >= 0 in training, as SAELens does. Once few latents fire (at most
    :data:`~sae_zoo.encoders.sparse_linear.SPARSE_FRACTION` of them in the last batch), training runs on each
    sample's active entries (:class:`SparseJumpReLULinear`), with the dense path's gradients.

    Reproduces SAELens's and Gemma Scope's ``jumprelu`` SAEs (and BatchTopK and Matryoshka SAEs that
    SAELens saved for inference), and dictionary_learning's ``JumpReluAutoEncoder``.
    """

    nonnegative_codes = True
    example_kwargs: dict[str, Any] = {"threshold_init": 0.01}
    architectures = ("jumprelu",)
    # a latent whose threshold sits above all its pre-activations gets no straight-through gradient and stays
    # dead: a run that targets an L0 starts 4x denser (SynthSAEBench cpu2k: 12% dead at the end against 42%
    # when started at the target), and the controller brings it down
    l0_start_factor = 4.0

    def __init__(self, d_model: int, n_latents: int, threshold_init: float = 0.001, bandwidth: float = 0.05,
                 sparsity_loss: Literal["step", "tanh"] = "step", tanh_scale: float = 4.0,
                 subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        if not bandwidth > 0:
            raise ValueError(f"jumprelu needs bandwidth > 0, got bandwidth={bandwidth!r}")
        if sparsity_loss not in ("step", "tanh"):
            raise ValueError(f"jumprelu sparsity_loss must be 'step' or 'tanh', got {sparsity_loss!r}")
        self.bandwidth, self.sparsity_loss, self.tanh_scale = float(bandwidth), sparsity_loss, float(tanh_scale)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents)
        self.threshold = nn.Parameter(torch.full((n_latents,), float(threshold_init)))

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        # ReLU(z) * 1[z > threshold], in z's place (a fresh tensor): one boolean pass and one fill, where the three
        # passes and three fresh tensors of the formula cost as much as the matmul on a CPU
        z = self.linear_map(x, dictionary)
        threshold = self.threshold.clamp_min(0)
        if not torch.is_grad_enabled():
            low, high = torch.aminmax(threshold)
            if low == high:  # one threshold for every latent (as built; a BatchTopK SAE saved as JumpReLU): one pass
                return F.threshold_(z, float(low), 0.0)
        return z.masked_fill_(z <= threshold, 0)

    def training_codes(self, x: Tensor, dictionary: nn.Module | None = None, sparse: bool = True) -> TrainingCodes:
        with torch.no_grad():
            self.threshold.clamp_(min=0)
        if self.trains_sparse(sparse):
            x = self.check_input(x, dictionary)
            values, indices, l0 = SparseJumpReLULinear.apply(self.centre(x, dictionary), self.linear.weight,
                                                             self.linear.bias, self.threshold, self.bandwidth)
            codes: Tensor | SparseCodes = SparseCodes(values, indices)
        else:
            codes, l0 = JumpReLUFunction.apply(self.linear_map(x, dictionary), self.threshold, self.bandwidth)
            values = codes
        self.record_density(l0)
        if self.sparsity_loss == "step":
            return TrainingCodes(codes, sparsity=l0)
        # the mean over samples and latents; the entries left out of sparse codes add tanh(0) = 0
        tanh = torch.tanh(self.tanh_scale * values).sum() / (values[..., 0].numel() * self.n_latents)
        return TrainingCodes(codes, sparsity=tanh)

    def firing_margins(self, x: Tensor, dictionary: nn.Module | None) -> Tensor | None:
        return self.linear_map(x, dictionary) - self.threshold.clamp_min(0)

    @torch.no_grad()
    def shift_thresholds(self, delta: Tensor) -> None:
        # thresholds stay >= 0 (as in training): what would take one below 0 moves the bias up instead
        moved = self.threshold.clamp_min(0) + delta
        self.threshold.copy_(moved.clamp_min(0))
        self.linear.bias.sub_(moved.clamp_max(0))

    def encode_flops(self) -> tuple[float, float]:
        # ReLU, the comparison and the mask (and the decoder-bias subtraction)
        return 2 * self.d_model * self.n_latents, 3 * self.n_latents + self.subtract_decoder_bias * self.d_model

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "JumpReLUEncoder":
        # one per latent, or one for all (as dictionary_learning's BatchTopK keeps it); require checks the shape
        threshold = sae.require("threshold")["threshold"].reshape(-1).expand(sae.n_latents)
        head = cls(sae.d_in, sae.n_latents,
                   subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", False)))
        weight, bias = sae.folded_encoder()
        scale = 1 if sae.keeps_norms else sae.decoder_norms
        load_linear(head.linear, weight, bias)
        with torch.no_grad():
            head.threshold.copy_(threshold * scale)
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        return linear_export(self, dictionary, "jumprelu", params={"threshold": self.threshold})
