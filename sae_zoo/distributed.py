"""What a multi-device run must agree on across its ranks, and the few collectives that make it agree.

Each rank of a DDP run sees its slice of every global batch. State that training keeps beside the weights (which
latents fired, BatchTopK's batch-wide selection and threshold, the rows resampling draws from) is then reduced
over the ranks, so that every rank holds what one process would hold after the same global batches. Outside a
multi-process run every helper is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """The number of processes training together (1 outside an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flags: Tensor) -> Tensor:
    """Boolean ``flags``, true where they are true on any rank."""
    if world_size() == 1:
        return flags
    reduced = flags.to(torch.int32)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.bool()


def summed(value: Tensor) -> Tensor:
    """``value`` summed over the ranks."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def smallest(value: Tensor) -> Tensor:
    """``value``'s elementwise minimum over the ranks."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def gathered_rows(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` (``(n_r, ...)``), concatenated in rank order: the global batch, where each rank holds
    its consecutive slice of it. Ranks may hold different numbers of rows."""
    world = world_size()
    if world == 1:
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device))
    width = int(max(c.item() for c in counts))
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:int(c.item())] for part, c in zip(parts, counts)])


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest of every rank's ``values`` together (``-inf`` when they hold fewer than ``k``): each
    rank offers its own ``k`` largest, which hold all of the global ``k`` largest."""
    local = values.reshape(-1).topk(min(k, values.numel()), sorted=False).values
    everyone = gathered_rows(local)
    if everyone.numel() < k:
        return values.new_tensor(float("-inf"))
    return everyone.topk(k, sorted=False).values.min()
