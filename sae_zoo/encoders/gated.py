"""Gated SAE encoder (Rajamanoharan et al. 2024): which latents fire and how strongly, on shared weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead, SparseCodes, TrainingCodes, kept_where_positive
from .interop import ForeignSAE
from .registry import register_encoder
from .sparse_linear import DensityRecord, linear_grads_at, padded_entries


class GatedFunction(torch.autograd.Function):
    """``(codes, gate_acts)`` of the gated SAE from the shared pre-activations ``z``: ``gate_acts =
    ReLU(z + b_gate)`` and ``codes = 1[z + b_gate > 0] * ReLU(scale * z + b_mag)``, with autograd's
    gradients (none through the gate's step). Writing a fresh ``(batch, n_latents)`` float tensor is what
    costs on a CPU, and the composed operations write twice as many as this does: the gate's activations
    take ``z``'s place and the codes the magnitudes', both masks are read off the outputs, and the scale's
    gradient comes from the codes
    (``z = (codes - b_mag) / scale`` where a latent fires)."""

    @staticmethod
    def forward(ctx, z: Tensor, b_gate: Tensor, scale: Tensor, b_mag: Tensor) -> tuple[Tensor, Tensor]:
        magnitude = torch.addcmul(b_mag, z, scale).clamp_min_(0)
        gate_acts = z.add_(b_gate).clamp_min_(0)  # z is not needed again
        ctx.mark_dirty(z)
        codes = kept_where_positive(magnitude, gate_acts, in_place=True)  # magnitude is not needed again
        ctx.save_for_backward(codes, gate_acts, scale, b_mag)
        return codes, gate_acts

    @staticmethod
    def backward(ctx, grad_codes: Tensor | None, grad_gate: Tensor | None) -> tuple[Tensor, ...]:
        codes, gate_acts, scale, b_mag = ctx.saved_tensors
        n = scale.shape[-1]
        grad_z = torch.zeros_like(gate_acts) if grad_gate is None else kept_where_positive(grad_gate, gate_acts)
        grad_b_gate = grad_z.reshape(-1, n).sum(0)
        if grad_codes is None:
            return grad_z, grad_b_gate, torch.zeros_like(scale), torch.zeros_like(b_mag)
        on_fired = kept_where_positive(grad_codes, codes)
        grad_b_mag = on_fired.reshape(-1, n).sum(0)
        grad_z.addcmul_(on_fired, scale)
        grad_scale = (on_fired.mul_(codes).reshape(-1, n).sum(0) - b_mag * grad_b_mag) / scale
        return grad_z, grad_b_gate, grad_scale, grad_b_mag


class GatePathLosses(torch.autograd.Function):
    """``(aux, sparsity)`` from the gate's activations: the MSE of ``x`` against their reconstruction through
    a frozen copy of the decoder, and their mean weighted per latent (by the atom norms, if any). The
    backward gives the activations' gradient from both in one product, the sparsity's per-latent constant
    entering as its bias, where autograd would write a second ``(batch, n_latents)`` tensor to add them."""

    @staticmethod
    def forward(ctx, gate_acts: Tensor, atoms: Tensor, bias: Tensor | None, x: Tensor,
                weights: Tensor | None) -> tuple[Tensor, Tensor]:
        flat = gate_acts.reshape(-1, gate_acts.shape[-1])
        residual = flat @ atoms - x.reshape(flat.shape[0], -1).to(flat.dtype)
        if bias is not None:
            residual += bias
        per_latent = flat.sum(0, dtype=torch.float32)
        ctx.save_for_backward(residual, atoms, per_latent, weights)
        ctx.shape = gate_acts.shape
        sparsity = (per_latent if weights is None else per_latent * weights).sum() / flat.numel()
        return residual.float().pow(2).mean(), sparsity

    @staticmethod
    def backward(ctx, grad_aux: Tensor, grad_sparsity: Tensor) -> tuple[Tensor | None, ...]:
        residual, atoms, per_latent, weights = ctx.saved_tensors
        per_element = grad_sparsity / (residual.shape[0] * atoms.shape[0])
        row = per_element * (torch.ones_like(per_latent) if weights is None else weights)
        scaled = residual * (2 * grad_aux / residual.numel()).to(residual.dtype)  # no float(): no device sync
        grad_acts = torch.addmm(row.to(residual.dtype), scaled, atoms.t().to(residual.dtype))
        grad_weights = per_element * per_latent if weights is not None and ctx.needs_input_grad[4] else None
        return grad_acts.reshape(ctx.shape), None, None, None, grad_weights


class SparseGatedLinear(torch.autograd.Function):
    """:class:`GatedFunction` of ``z = x W^T``, as each sample's entries whose gate fires
    (``(codes, gate_acts, indices)``, padded: :func:`~sae_zoo.encoders.sparse_linear.padded_entries`): the only
    entries with a code, a gate activation or a gradient. The same gradients as the dense way, from products
    over the entries instead of dense ones (:func:`~sae_zoo.encoders.sparse_linear.linear_grads_at`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, b_gate: Tensor, scale: Tensor, b_mag: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        z = F.linear(x, weight)
        flat = z.reshape(-1, z.shape[-1])
        indices, real, (z_at,) = padded_entries(flat + b_gate > 0, flat)
        gate_acts = (z_at + b_gate[indices]) * real
        codes = torch.addcmul(b_mag[indices], z_at, scale[indices]).clamp_min_(0) * real
        ctx.save_for_backward(x, weight, indices, z_at, codes, gate_acts, scale)
        ctx.mark_non_differentiable(indices)
        shape = (*z.shape[:-1], indices.shape[-1])
        return codes.reshape(shape), gate_acts.reshape(shape), indices.reshape(shape)

    @staticmethod
    def backward(ctx, grad_codes: Tensor | None, grad_gate: Tensor | None,
                 grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, indices, z_at, codes, gate_acts, scale = ctx.saved_tensors
        n = scale.shape[-1]

        def per_latent(values: Tensor) -> Tensor:
            return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, indices.flatten(),
                                                                                        values.flatten())

        on_gate = (torch.zeros_like(gate_acts) if grad_gate is None
                   else kept_where_positive(grad_gate.reshape(gate_acts.shape), gate_acts))
        on_fired = (torch.zeros_like(codes) if grad_codes is None
                    else kept_where_positive(grad_codes.reshape(codes.shape), codes))
        grad_z = on_gate + on_fired * scale[indices]
        grad_x, grad_weight, _ = linear_grads_at(x, weight, indices, grad_z,
                                                 (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False))
        return grad_x, grad_weight, per_latent(on_gate), per_latent(on_fired * z_at), per_latent(on_fired)


#: rows of pre-activations whose gate an inference forward computes at once (about 2 MB at 16k latents)
GATE_ROWS = 32


@register_encoder("gated")
class GatedEncoder(DensityRecord, EncoderHead):
    """``codes = 1[W x + b_gate > 0] * ReLU(exp(r_mag) * (W x) + b_mag)``: the gate path decides which
    latents fire, the magnitude path (the same ``W``, rescaled per latent by ``exp(r_mag)``) how strongly.

    The gate has no gradient, so training adds the paper's two terms: the sparsity penalty is the L1 of
    ``ReLU(W x + b_gate)`` (times the atom norms), and ``aux_loss`` asks that gate path alone to
    reconstruct ``x`` through a frozen copy of the decoder. Reproduces SAELens's ``gated`` SAE. Once few gates
    fire (at most :data:`~sae_zoo.encoders.sparse_linear.SPARSE_FRACTION` in the last batch), training runs on
    each sample's firing entries (:class:`SparseGatedLinear`), with the dense path's gradients.
    """

    reads_dictionary = True  # the gate path reconstructs the input through the frozen decoder
    nonnegative_codes = True
    architectures = ("gated",)

    def __init__(self, d_model: int, n_latents: int, subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents, bias=False)
        self.b_gate = nn.Parameter(torch.zeros(n_latents))
        self.r_mag = nn.Parameter(torch.zeros(n_latents))
        self.b_mag = nn.Parameter(torch.zeros(n_latents))

    def _shared(self, x: Tensor, dictionary: nn.Module | None) -> Tensor:
        """``W x`` (of the centred input): what both paths start from."""
        return self.centred_linear(self.check_input(x, dictionary), dictionary, self.linear.weight)

    def _paths(self, x: Tensor, dictionary: nn.Module | None) -> tuple[Tensor, Tensor]:
        z = self._shared(x, dictionary)
        return z + self.b_gate, z * self.r_mag.exp() + self.b_mag

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        if torch.is_grad_enabled():  # autograd keeps z for the magnitude's gradient: no writing over it
            gate, magnitude = self._paths(x, dictionary)
            return (gate > 0) * magnitude.relu()
        # the same values written over z, a block of rows at a time: the gate of each block is a small fresh tensor
        # that the allocator reuses, where a (batch, n_latents) one would be fresh memory, whose first touch on a
        # CPU costs about as much as the matmul's own output
        z = self._shared(x, dictionary)
        scale = self.r_mag.exp()
        for rows in z.view(-1, z.shape[-1]).split(GATE_ROWS):
            gate = rows + self.b_gate
            kept_where_positive(rows.mul_(scale).add_(self.b_mag).clamp_min_(0), gate, in_place=True)
        return z

    def training_codes(self, x: Tensor, dictionary: nn.Module | None = None, sparse: bool = True) -> TrainingCodes:
        if dictionary is None:
            raise ValueError("the gated head trains against the dictionary: training_codes(x, dictionary)")
        bias = None if dictionary.bias is None else dictionary.bias.detach()
        norms = getattr(dictionary, "atom_norms", None)
        if self.trains_sparse(sparse):
            x = self.check_input(x, dictionary)
            values, gate_acts, indices = SparseGatedLinear.apply(self.centre(x, dictionary), self.linear.weight,
                                                                 self.b_gate, self.r_mag.exp(), self.b_mag)
            # the gate path's reconstruction through a frozen copy of the decoder, and its (weighted) L1
            weights = gate_acts if norms is None else gate_acts * norms.detach()[indices]
            gate_hat = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), dictionary.weight.detach(),
                                       per_sample_weights=weights.reshape(-1, indices.shape[-1]),
                                       mode="sum").reshape(x.shape)
            aux = F.mse_loss(gate_hat if bias is None else gate_hat + bias, x)
            weighed = gate_acts if norms is None else gate_acts * norms[indices]
            entries = gate_acts[..., 0].numel() * self.n_latents  # every sample's latents, listed or not
            self.record_density(torch.count_nonzero(gate_acts) / entries)
            return TrainingCodes(SparseCodes(values, indices), sparsity=weighed.sum() / entries, aux_loss=aux)
        codes, gate_acts = GatedFunction.apply(self._shared(x, dictionary), self.b_gate, self.r_mag.exp(), self.b_mag)
        aux, sparsity = GatePathLosses.apply(gate_acts, dictionary.atoms.detach(), bias, x, norms)
        self.record_density(torch.count_nonzero(gate_acts) / gate_acts.numel())
        return TrainingCodes(codes, sparsity=sparsity, aux_loss=aux)

    def firing_margins(self, x: Tensor, dictionary: nn.Module | None) -> Tensor | None:
        # the gate decides which latents fire, among those whose magnitude is positive (the others, below any gate)
        gate, magnitude = self._paths(x, dictionary)
        return torch.where(magnitude > 0, gate, gate.detach().min() - 1)

    @torch.no_grad()
    def shift_thresholds(self, delta: Tensor) -> None:
        self.b_gate.sub_(delta)

    def encode_flops(self) -> tuple[float, float]:
        # one product; gate bias and comparison, magnitude scale, bias and ReLU, the product of both (2N + 4N)
        return 2 * self.d_model * self.n_latents, 6 * self.n_latents + self.subtract_decoder_bias * self.d_model

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "GatedEncoder":
        tensors = sae.require("W_enc", "b_gate", "r_mag", "b_mag")
        head = cls(sae.d_in, sae.n_latents, subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", True)))
        with torch.no_grad():
            head.linear.weight.copy_(tensors["W_enc"])
            for name in ("b_gate", "r_mag", "b_mag"):
                getattr(head, name).copy_(tensors[name])
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        return ForeignSAE.of_dictionary("gated", dictionary, W_enc=self.linear.weight,
                                        config={"apply_b_dec_to_input": self.subtract_decoder_bias},
                                        params={n: getattr(self, n) for n in ("b_gate", "r_mag", "b_mag")})
