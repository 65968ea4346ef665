"""CE-loss recovered: the language model's next-token loss with a hook's activations replaced by a
sparse coder's reconstruction."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._modes import evaluating
from ..data.activations import ActivationDataModule
from ..lm import next_token_loss
from ..model import SparseCoder
from .bootstrap import bootstrap_se


def _splice(fn: Callable[[Tensor], Tensor], scale: float, keep_first: bool,
            outlier_norm: float | None) -> Callable[[Tensor], Tensor]:
    """``fn`` applied at the hook, except at positions left out of the data (BOS when ``keep_first``, tokens
    whose scaled norm exceeds ``outlier_norm``), which keep their own activations."""

    def replace(acts: Tensor) -> Tensor:
        new = fn(acts)
        keep = torch.zeros(acts.shape[:-1], dtype=torch.bool, device=acts.device)
        if keep_first:  # BOS positions were not in the data: leave them as they were
            keep[:, 0] = True
        if outlier_norm is not None:
            keep |= acts.float().norm(dim=-1) * scale > outlier_norm
        return torch.where(keep[..., None], acts, new)
    return replace


@torch.no_grad()
def ce_baselines(datamodule: ActivationDataModule) -> dict[str, Tensor]:
    """Per-context next-token losses ``ce_clean`` and ``ce_zero_ablation`` (the hook's activations zeroed) on
    the ``ce_contexts`` held-out contexts: what every model's CE-loss recovered is measured against."""
    tokens, scale, keep_first = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    zeroed = _splice(torch.zeros_like, scale, keep_first, datamodule.outlier_norm)
    losses: dict[str, list[Tensor]] = {"ce_clean": [], "ce_zero_ablation": []}
    for chunk in tokens.split(datamodule.hparams.model_batch_size):
        losses["ce_clean"].append(next_token_loss(lm, chunk))
        losses["ce_zero_ablation"].append(next_token_loss(lm, chunk, hook, zeroed))
    return {k: torch.cat(v).double().cpu() for k, v in losses.items()}


@torch.no_grad()
def ce_spliced(coder: SparseCoder, datamodule: ActivationDataModule) -> Tensor:
    """Per-context next-token loss (float64, ``(ce_contexts,)``) with the hook's activations replaced by
    ``coder``'s reconstruction (see :func:`ce_loss_recovered`)."""
    tokens, scale, keep_first = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    device = next(coder.parameters(), torch.empty(0)).device

    def reconstruct(acts: Tensor) -> Tensor:
        x_hat, _ = coder((acts.float() * scale).to(device))
        return (x_hat / scale).to(acts.dtype).to(acts.device)

    replace = _splice(reconstruct, scale, keep_first, datamodule.outlier_norm)
    spliced = []
    with evaluating(coder):  # inference behaviour (an iterative head solves instead of returning its warm start)
        for chunk in tokens.split(datamodule.hparams.model_batch_size):
            spliced.append(next_token_loss(lm, chunk, hook, replace))
    return torch.cat(spliced).double().cpu()


def recovered_fraction(weights: Tensor, spliced: Tensor, clean: Tensor, zero: Tensor) -> Tensor:
    """CE-loss recovered of contexts weighted by ``weights`` (``(..., C)``)."""
    return 1 - (weights @ (spliced - clean)) / (weights @ (zero - clean))


@torch.no_grad()
def ce_loss_recovered(coder: SparseCoder, datamodule: ActivationDataModule,
                      baselines: dict[str, Tensor] | None = None) -> dict[str, float]:
    """CE-loss recovered on the datamodule's ``ce_contexts`` held-out contexts: the LM's next-token loss
    with the hook's activations replaced by ``coder``'s reconstruction, against the clean loss and the
    loss with them zeroed: ``1 - (CE_recon - CE_clean) / (CE_zero - CE_clean)``, with its standard error
    by bootstrap over contexts. Positions left out of the data (BOS, outlier tokens) keep their own
    activations in both the spliced and the zeroed runs. ``baselines`` (:func:`ce_baselines`) saves the
    clean and zeroed passes when many models are measured on the same data."""
    baselines = ce_baselines(datamodule) if baselines is None else baselines
    return ce_figures(baselines, ce_spliced(coder, datamodule))


def ce_figures(baselines: dict[str, Tensor], spliced: Tensor) -> dict[str, float]:
    """The mean losses, CE-loss recovered and its standard error by bootstrap over contexts, from the
    per-context losses of :func:`ce_baselines` and :func:`ce_spliced`."""
    per_context = {**baselines, "ce_spliced": spliced}  # (contexts,) each
    clean, zero = per_context["ce_clean"], per_context["ce_zero_ablation"]

    def recovered(weights: Tensor) -> Tensor:
        return recovered_fraction(weights, spliced, clean, zero)

    means = {k: float(v.mean()) for k, v in per_context.items()}
    gap = means["ce_zero_ablation"] - means["ce_clean"]
    means["ce_loss_recovered"] = float(recovered(torch.ones_like(clean))) if gap else float("nan")
    means["ce_loss_recovered_se"] = bootstrap_se(recovered, len(clean)) if gap else float("nan")
    means["ce_contexts"] = len(clean)
    return means
