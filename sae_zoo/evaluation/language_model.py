"""CE-loss recovered: the language model's next-token loss with a hook's activations replaced by a
sparse coder's output (an SAE's reconstruction; a transcoder's prediction of an MLP's output, the MLP replaced)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._modes import evaluating
from ..data.activations import any_outlier
from ..data.base import LanguageModelData
from ..lm import next_token_loss
from ..model import SparseCoder
from .bootstrap import bootstrap_se
from .held_out import check_pairing


def _splice(fn: Callable[..., Tensor], datamodule: LanguageModelData) -> Callable[..., Tensor]:
    """``fn`` applied where the data write (the targets' hook), except at positions left out of the data (BOS when
    position 0 is left out, outlier tokens), which keep their own activations. ``fn(activations)``, or for paired
    data ``fn(activations, inputs)`` with the inputs read earlier in the same pass, as the returned function is
    called."""
    _, _, keep_first = datamodule.ce_batches()
    scales = (datamodule.target_scale, datamodule.scale)
    bounds = (datamodule.target_outlier_norm, datamodule.outlier_norm)

    def replace(acts: Tensor, *inputs: Tensor) -> Tensor:
        new = fn(acts, *inputs)
        # the data leave these tokens out: the same definition as theirs, on the scaled activations
        keep = any_outlier([side.float() * scale for side, scale in zip((acts, *inputs), scales)], bounds)
        if keep_first:  # BOS positions were not in the data: leave them as they were
            keep[:, 0] = True
        return torch.where(keep[..., None], acts, new)
    return replace


def _losses(datamodule: LanguageModelData, fn: Callable[..., Tensor] | None) -> Tensor:
    """Per-context next-token losses (float64, on the CPU) on the ``ce_contexts`` held-out contexts, with ``fn``
    spliced in (:func:`_splice`) where given."""
    tokens, _, _ = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    where = {} if fn is None else {"hook": datamodule.target_hook, "replace": _splice(fn, datamodule),
                                   "reads": hook if datamodule.paired else None}
    return torch.cat([next_token_loss(lm, chunk, **where)
                      for chunk in tokens.split(datamodule.model_batch_size)]).double().cpu()


@dataclass(frozen=True)
class CELosses:
    """Per-context next-token losses (float64, ``(ce_contexts,)``) on the ``ce_contexts`` held-out contexts:
    ``clean``, with the activations the model writes zeroed (``zero_ablation``) and replaced by their mean
    (``mean_ablation``), and, once a model is measured, with its output spliced in (``spliced``)."""

    clean: Tensor
    zero_ablation: Tensor
    spliced: Tensor | None = None
    mean_ablation: Tensor | None = None

    def recovered(self, weights: Tensor, ablation: Tensor | None = None) -> Tensor:
        """CE-loss recovered of contexts weighted by ``weights`` (``(..., contexts)``), against ``ablation``
        (zero ablation by default)."""
        ablation = self.zero_ablation if ablation is None else ablation
        return 1 - (weights @ (self.spliced - self.clean)) / (weights @ (ablation - self.clean))

    def figures(self) -> dict[str, float]:
        """The mean losses, CE-loss recovered against zero ablation (``ce_loss_recovered``) and against mean ablation
        (``ce_loss_recovered_vs_mean``), each with its standard error by bootstrap over contexts."""
        means = {"ce_clean": float(self.clean.mean()), "ce_zero_ablation": float(self.zero_ablation.mean()),
                 "ce_spliced": float(self.spliced.mean())}
        ablations = [("", self.zero_ablation)]
        if self.mean_ablation is not None:
            means["ce_mean_ablation"] = float(self.mean_ablation.mean())
            ablations.append(("_vs_mean", self.mean_ablation))
        for suffix, ablation in ablations:
            def recovered(weights: Tensor, ablation: Tensor = ablation) -> Tensor:
                return self.recovered(weights, ablation)

            gap = float(ablation.mean()) - means["ce_clean"]
            means[f"ce_loss_recovered{suffix}"] = float(recovered(torch.ones_like(self.clean))) if gap else float("nan")
            means[f"ce_loss_recovered{suffix}_se"] = bootstrap_se(recovered, len(self.clean)) if gap else float("nan")
        means["ce_contexts"] = len(self.clean)
        return means


@torch.no_grad()
def ce_baselines(datamodule: LanguageModelData) -> CELosses:
    """Per-context next-token losses, clean, with the written activations (the targets' hook: an MLP's output for a
    transcoder) zeroed, and with them replaced by their mean over training tokens, on the ``ce_contexts`` held-out
    contexts: what every model's CE-loss recovered is measured against."""
    mean = datamodule.target_mean

    def mean_ablated(acts: Tensor, *inputs: Tensor) -> Tensor:
        return mean.to(acts.device, acts.dtype).expand_as(acts)

    def zeroed(acts: Tensor, *inputs: Tensor) -> Tensor:
        return torch.zeros_like(acts)

    return CELosses(clean=_losses(datamodule, None), zero_ablation=_losses(datamodule, zeroed),
                    mean_ablation=_losses(datamodule, mean_ablated))


@torch.no_grad()
def ce_spliced(coder: SparseCoder, datamodule: LanguageModelData, baselines: CELosses | None = None) -> CELosses:
    """``baselines`` (:func:`ce_baselines`, computed when not given) with the per-context losses with the written
    activations replaced by ``coder``'s output (see :func:`ce_loss_recovered`): an SAE's reconstruction of them, a
    transcoder's prediction of them from its inputs (the MLP replaced)."""
    check_pairing(coder, datamodule)
    baselines = ce_baselines(datamodule) if baselines is None else baselines
    device = next(coder.parameters(), torch.empty(0)).device
    scale, target_scale = datamodule.scale, datamodule.target_scale

    def output(acts: Tensor, *inputs: Tensor) -> Tensor:
        x = inputs[0] if inputs else acts
        y_hat, _ = coder((x.float() * scale).to(device))
        return (y_hat / target_scale).to(acts.dtype).to(acts.device)

    with evaluating(coder):  # inference behaviour (an iterative head solves instead of returning its warm start)
        spliced = _losses(datamodule, output)
    return dataclasses.replace(baselines, spliced=spliced)


def ce_loss_recovered(coder: SparseCoder, datamodule: LanguageModelData,
                      baselines: CELosses | None = None) -> dict[str, float]:
    """CE-loss recovered on the datamodule's ``ce_contexts`` held-out contexts: the LM's next-token loss with the
    activations the model writes (its input for an SAE; the targets' hook, e.g. an MLP's output, for a transcoder)
    replaced by ``coder``'s output, against the clean loss and the loss with them zeroed:
    ``1 - (CE_replaced - CE_clean) / (CE_zero - CE_clean)``, and the same against mean ablation, each with its
    standard error by bootstrap over contexts. Positions left out of the data (BOS, outlier tokens) keep their own
    activations in the spliced and the ablated runs. ``baselines`` (:func:`ce_baselines`) saves the clean and
    ablated passes when many models are measured on the same data."""
    return ce_spliced(coder, datamodule, baselines).figures()
