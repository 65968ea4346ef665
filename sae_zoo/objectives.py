"""The pieces of the training objective beyond ``MSE + coeff * sparsity``: Matryoshka prefixes, AuxK,
dead-latent bookkeeping, the decoder bias's starting point and the schedules. ``SparseCoder`` uses them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import EncoderHead, SparseCodes


def check_matryoshka_widths(widths: Sequence[int], n_latents: int) -> list[int]:
    """Strictly increasing prefix widths that end at ``n_latents``; a ``ValueError`` names what is wrong."""
    widths = [int(w) for w in widths]
    if not widths or widths[-1] != n_latents:
        raise ValueError(f"matryoshka_widths must end at n_latents ({n_latents}), got {widths}")
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka_widths must be positive and strictly increasing, got {widths}")
    return widths


def reconstruction_loss(dictionary: nn.Module, codes: Tensor | SparseCodes, x: Tensor,
                        widths: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``(loss, x_hat)``: the MSE of the full reconstruction, or with Matryoshka ``widths`` the sum of
    the MSEs of every prefix's reconstruction (latents ``[0, w)`` alone), built up group by group."""
    sparse = isinstance(codes, SparseCodes)
    decode = (lambda c: dictionary.decode_sparse(*c)) if sparse else dictionary.decode
    if not widths:
        x_hat = decode(codes)
        return F.mse_loss(x_hat, x), x_hat
    if sparse:
        prefixes = dictionary.decode_sparse_prefixes(*codes, list(widths))
        loss = sum(F.mse_loss(prefixes[..., g, :], x) for g in range(len(widths)))
        return loss, prefixes[..., -1, :]
    bias = dictionary.bias if dictionary.bias is not None else 0
    x_hat, loss, start = None, x.new_zeros(()), 0
    for end in widths:
        part = codes[..., start:end] @ dictionary.atoms[start:end]
        x_hat = bias + part if x_hat is None else x_hat + part
        loss = loss + F.mse_loss(x_hat, x)
        start = end
    return loss, x_hat


def fired_latents(codes: Tensor | SparseCodes, n_latents: int) -> Tensor:
    """Boolean ``(n_latents,)``: which latents were non-zero anywhere in the batch (no synchronisation)."""
    if isinstance(codes, SparseCodes):
        counts = torch.zeros(n_latents, device=codes.values.device).index_add_(
            0, codes.indices.reshape(-1), (codes.values != 0).reshape(-1).float())
        return counts > 0
    return (codes.detach() != 0).reshape(-1, n_latents).any(0)


def auxk_loss(head: EncoderHead, dictionary: nn.Module, x: Tensor, x_hat: Tensor, dead: Tensor,
              k_aux: int, target: Tensor | None = None) -> Tensor:
    """Gao et al. (2024): the ``k_aux`` largest pre-activations among the ``dead`` latents reconstruct the
    residual ``x - x_hat`` of the live ones (MSE, no decoder bias), scaled down by ``n_dead / k_aux`` when
    fewer than ``k_aux`` are dead. Zero when none is dead. A transcoder's residual is ``target - x_hat``: the
    pre-activations still read ``x``."""
    latents = dead.nonzero().squeeze(-1)
    if latents.numel() == 0:
        return x_hat.new_zeros(())
    k = min(k_aux, latents.numel())
    values, picks = head.pre_activations(x, dictionary, latents).relu().topk(k, dim=-1, sorted=False)
    bias = dictionary.bias if dictionary.bias is not None else 0
    residual_hat = dictionary.decode_sparse(values, latents[picks]) - bias
    residual = (x if target is None else target) - x_hat
    return min(latents.numel() / k_aux, 1.0) * F.mse_loss(residual_hat, residual.detach())


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distance to ``points`` ``(n, d)`` (Weiszfeld's algorithm):
    a centre that a few outlying activations cannot drag."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        done = (new - median).norm() <= tol * median.norm().clamp_min(1e-12)
        median = new
        if done:
            break
    return median.float()


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0 over ``warmup_steps``, constant, then linear decay
    to 0 over the last ``decay_steps`` of ``total_steps`` (as SAELens and dictionary_learning do)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if decay_steps and step >= total_steps - decay_steps:
        factor = min(factor, max(0.0, (total_steps - step) / decay_steps))
    return factor


def adam(groups: list[dict], lr: float = 1e-3) -> torch.optim.Adam:
    """Adam over parameter ``groups``, fused (one pass over every parameter, about 4x faster than the
    per-tensor loop on a CPU) where every parameter is on a CPU or CUDA device."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.Adam(groups, lr=lr, fused=fused or None)
