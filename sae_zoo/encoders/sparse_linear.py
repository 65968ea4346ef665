"""Training a linear encoder's few active latents without dense products after the forward one.

A head whose codes are sparse needs, in its backward, the gradient of ``x W^T + b`` only at its active
entries. The dense way forms three more ``(batch, n_latents)``-wide products (the decoder's forward and
gradients) and the encoder's weight gradient; gathered per entry, each costs ``entries x d_model`` instead.
Top-k heads keep ``k`` entries per sample; threshold heads (JumpReLU, gated) keep a varying number, padded
here to the widest sample's count with zero values that decode to nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: threshold heads train on their active entries when the last training batch had at most this fraction of
#: them active. Above it, the gathers cost more than the dense products they replace: on 2 CPU cores (d_model
#: 576, 18,432 latents, batch 1,024) a JumpReLU step took 0.41 s sparse against 0.59 s dense at 1.6% active,
#: and 0.72 s against 0.59 s at 3.1% (gated: 0.44 against 0.71, and 0.73 against 0.71)
SPARSE_FRACTION = 1 / 48


def padded_entries(mask: Tensor, *values: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The True entries of a ``(samples, n)`` mask, as ``(indices, real, gathered)``: each sample's column
    indices ``(samples, m)``, padded with 0 to the widest sample's count ``m`` (at least 1), ``real`` saying
    which slots are entries, and each of ``values`` ``(samples, n)`` read at them (0 in the padding)."""
    rows, cols = mask.nonzero(as_tuple=True)
    samples = mask.shape[0]
    counts = torch.bincount(rows, minlength=samples)
    width = max(1, int(counts.max())) if rows.numel() else 1
    slots = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(samples, width, dtype=torch.long, device=mask.device)
    indices[rows, slots] = cols
    real = torch.zeros(samples, width, dtype=torch.bool, device=mask.device)
    real[rows, slots] = True
    gathered = []
    for value in values:
        out = value.new_zeros(samples, width)
        out[rows, slots] = value[rows, cols]
        gathered.append(out)
    return indices, real, gathered


def linear_grads_at(x: Tensor, weight: Tensor, indices: Tensor, grad: Tensor,
                    needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``x W^T + b`` (input, weight, bias; each only where ``needs`` says) from the
    gradient ``grad`` ``(samples, m)`` of its entries at ``indices`` ``(samples, m)``: a gather of ``W``'s
    rows for the input, an ``index_add`` of ``grad x`` for the weight and of ``grad`` for the bias."""
    m, d_model = indices.shape[-1], weight.shape[1]
    grad, rows = grad.reshape(-1, m).to(weight.dtype), indices.reshape(-1, m)
    grad_x = grad_weight = grad_bias = None
    if needs[0]:
        grad_x = F.embedding_bag(rows, weight, per_sample_weights=grad, mode="sum").reshape(x.shape).to(x.dtype)
    if needs[1]:
        flat_x = x.reshape(-1, d_model).to(weight.dtype)
        grad_weight = torch.zeros_like(weight).index_add_(0, rows.flatten(),
                                                          (grad[..., None] * flat_x[:, None, :]).reshape(-1, d_model))
    if needs[2]:
        grad_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device).index_add_(
            0, rows.flatten(), grad.flatten())
    return grad_x, grad_weight, grad_bias


class DensityRecord:
    """For a threshold head: the fraction of entries active in its last training batch (a tensor written
    without a synchronisation, read before the next: on a GPU, one synchronisation per step), and whether the
    next one trains on its entries. The choice changes the speed only: both ways give the same gradients."""

    def record_density(self, fraction: Tensor) -> None:
        self._last_density = fraction.detach()

    def trains_sparse(self, sparse: bool) -> bool:
        """Whether this training batch goes the sparse way: asked for, and the last batch was sparse enough
        (the first batch, with nothing recorded, goes the dense way)."""
        last = getattr(self, "_last_density", None)
        return sparse and last is not None and float(last) <= SPARSE_FRACTION
