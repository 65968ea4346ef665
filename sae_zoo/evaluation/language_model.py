"""CE-loss recovered: the language model's next-token loss with a hook's activations replaced by a
sparse coder's reconstruction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._modes import evaluating
from ..data.activations import ActivationDataModule, outlier_mask
from ..lm import next_token_loss
from ..model import SparseCoder
from .bootstrap import bootstrap_se


def _splice(fn: Callable[[Tensor], Tensor], scale: float, keep_first: bool,
            outlier_norm: float | None) -> Callable[[Tensor], Tensor]:
    """``fn`` applied at the hook, except at positions left out of the data (BOS when ``keep_first``, tokens
    whose scaled norm exceeds ``outlier_norm``), which keep their own activations."""

    def replace(acts: Tensor) -> Tensor:
        new = fn(acts)
        keep = outlier_mask(acts.float() * scale, outlier_norm)  # the data leave these tokens out
        if keep_first:  # BOS positions were not in the data: leave them as they were
            keep[:, 0] = True
        return torch.where(keep[..., None], acts, new)
    return replace


@dataclass(frozen=True)
class CELosses:
    """Per-context next-token losses (float64, ``(ce_contexts,)``) on the ``ce_contexts`` held-out contexts:
    ``clean``, with the hook's activations zeroed (``zero_ablation``), and, once a model is measured, with its
    reconstruction spliced in (``spliced``)."""

    clean: Tensor
    zero_ablation: Tensor
    spliced: Tensor | None = None

    def recovered(self, weights: Tensor) -> Tensor:
        """CE-loss recovered of contexts weighted by ``weights`` (``(..., contexts)``)."""
        return 1 - (weights @ (self.spliced - self.clean)) / (weights @ (self.zero_ablation - self.clean))

    def figures(self) -> dict[str, float]:
        """The mean losses, CE-loss recovered and its standard error by bootstrap over contexts."""
        means = {"ce_clean": float(self.clean.mean()), "ce_zero_ablation": float(self.zero_ablation.mean()),
                 "ce_spliced": float(self.spliced.mean())}
        gap = means["ce_zero_ablation"] - means["ce_clean"]
        means["ce_loss_recovered"] = float(self.recovered(torch.ones_like(self.clean))) if gap else float("nan")
        means["ce_loss_recovered_se"] = bootstrap_se(self.recovered, len(self.clean)) if gap else float("nan")
        means["ce_contexts"] = len(self.clean)
        return means


@torch.no_grad()
def ce_baselines(datamodule: ActivationDataModule) -> CELosses:
    """Per-context next-token losses, clean and with the hook's activations zeroed, on the ``ce_contexts``
    held-out contexts: what every model's CE-loss recovered is measured against."""
    tokens, scale, keep_first = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    zeroed = _splice(torch.zeros_like, scale, keep_first, datamodule.outlier_norm)
    clean, zero = [], []
    for chunk in tokens.split(datamodule.hparams.model_batch_size):
        clean.append(next_token_loss(lm, chunk))
        zero.append(next_token_loss(lm, chunk, hook, zeroed))
    return CELosses(*(torch.cat(v).double().cpu() for v in (clean, zero)))


@torch.no_grad()
def ce_spliced(coder: SparseCoder, datamodule: ActivationDataModule, baselines: CELosses | None = None) -> CELosses:
    """``baselines`` (:func:`ce_baselines`, computed when not given) with the per-context losses with the hook's
    activations replaced by ``coder``'s reconstruction (see :func:`ce_loss_recovered`)."""
    baselines = ce_baselines(datamodule) if baselines is None else baselines
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
    return dataclasses.replace(baselines, spliced=torch.cat(spliced).double().cpu())


def ce_loss_recovered(coder: SparseCoder, datamodule: ActivationDataModule,
                      baselines: CELosses | None = None) -> dict[str, float]:
    """CE-loss recovered on the datamodule's ``ce_contexts`` held-out contexts: the LM's next-token loss
    with the hook's activations replaced by ``coder``'s reconstruction, against the clean loss and the
    loss with them zeroed: ``1 - (CE_recon - CE_clean) / (CE_zero - CE_clean)``, with its standard error
    by bootstrap over contexts. Positions left out of the data (BOS, outlier tokens) keep their own
    activations in both the spliced and the zeroed runs. ``baselines`` (:func:`ce_baselines`) saves the
    clean and zeroed passes when many models are measured on the same data."""
    return ce_spliced(coder, datamodule, baselines).figures()
