"""Held-out reconstruction on language-model activations, with the outlier tokens counted apart and
standard errors by bootstrap over contexts."""

from __future__ import annotations

import torch
from torch import Tensor

from .._modes import evaluating
from ..data.activations import ActivationDataModule, outlier_mask
from ..metrics import SparseCodingMetrics
from ..model import Reconstruction, SparseCoder
from .bootstrap import bootstrap_se


def context_fvu(weights: Tensor, sse: Tensor, n: Tensor, sum_sq: Tensor, sum_x: Tensor) -> Tensor:
    """FVU of contexts weighted by ``weights`` (``(..., C)``): summed squared error over the summed squared
    deviation from the weighted mean (the formula of :class:`~sae_zoo.metrics.FVU`)."""
    total_x = weights @ sum_x
    return (weights @ sse) / (weights @ sum_sq - total_x.square().sum(-1) / (weights @ n))


@torch.no_grad()
def context_sums(model: SparseCoder, datamodule: ActivationDataModule,
                 metrics: SparseCodingMetrics | None = None) -> dict[str, list[Tensor]]:
    """Per held-out context, for the ``clean`` tokens (outliers left out) and for ``all``: the summed squared
    error, the token count, the summed ``||x||^2`` and the summed ``x`` (float64), from which
    :func:`context_fvu` gives the FVU of any weighting of the contexts (bootstrap resamples included). In the
    same pass, the clean tokens are added to ``metrics`` (the model's test metrics), if given."""
    rows, per_context = datamodule.held_out_rows(), datamodule.tokens_per_context
    max_norm = datamodule.outlier_norm
    n_contexts = -(-int(rows.offsets[-1]) // per_context)
    # per context: squared error, tokens, sum of ||x||^2 and sum of x, for the clean tokens and for all
    stats = {kind: [torch.zeros(n_contexts, dtype=torch.float64) for _ in range(3)]
             + [torch.zeros(n_contexts, datamodule.d_model, dtype=torch.float64)] for kind in ("clean", "all")}
    start = 0
    with evaluating(model):
        for x in rows:
            context = torch.arange(start, start + len(x)) // per_context
            start += len(x)
            on_device = x.to(model.device)
            out = model(on_device)
            clean = ~outlier_mask(x, max_norm)
            if metrics is not None:
                keep = clean.to(model.device)
                model.update_metrics(metrics, on_device[keep], Reconstruction(out.x_hat[keep], out.codes[keep]))
            x_hat, x = out.x_hat.double().cpu(), x.double()
            values = ((x - x_hat).square().sum(-1), torch.ones(len(x), dtype=torch.float64), x.square().sum(-1), x)
            for kind, keep in (("clean", clean), ("all", slice(None))):
                for total, value in zip(stats[kind], values):
                    total.index_add_(0, context[keep], value[keep])
    return stats


@torch.no_grad()
def held_out_statistics(model: SparseCoder, datamodule: ActivationDataModule,
                        sums: dict[str, list[Tensor]] | None = None) -> dict[str, float]:
    """FVU without the outlier tokens (what ``evaluate`` reports) and with them, each with its standard
    error over contexts; how many held-out tokens are outliers and the norm that makes one. ``sums``:
    the model's :func:`context_sums`, when already computed."""
    stats, max_norm = sums or context_sums(model, datamodule), datamodule.outlier_norm
    n_contexts = len(stats["all"][1])
    ones = torch.ones(n_contexts, dtype=torch.float64)
    out = {"held_out_tokens": int(stats["all"][1].sum()),
           "outlier_tokens": int(stats["all"][1].sum() - stats["clean"][1].sum())}
    for kind, suffix in (("clean", ""), ("all", "_with_outliers")):
        out[f"fvu{suffix}"] = float(context_fvu(ones, *stats[kind]))
        out[f"fvu{suffix}_se"] = bootstrap_se(lambda w, s=stats[kind]: context_fvu(w, *s), n_contexts)
    if max_norm is not None:
        out["outlier_norm"] = float(max_norm)
    return out
