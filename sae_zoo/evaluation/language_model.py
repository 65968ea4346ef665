"""CE-loss recovered and the KL score: the language model's next-token loss, and its next-token distributions, with a
hook's activations replaced by a sparse coder's output (an SAE's reconstruction; a transcoder's prediction of an MLP's
output, the MLP replaced), as SAELens's ``get_recons_loss`` and SAEBench's core measure them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from .._modes import evaluating
from ..data.activations import any_outlier
from ..data.base import LanguageModelData
from ..lm import intercept, lm_logits, token_kl, token_losses, transcoding
from ..model import SparseCoder
from .bootstrap import bootstrap_se
from .held_out import check_pairing


def _splice(fn: Callable[..., Tensor], datamodule: LanguageModelData,
            every_position: bool = False) -> Callable[..., Tensor]:
    """``fn`` applied where the data write (the targets' hook), except, unless ``every_position``, at positions left
    out of the data (BOS when position 0 is left out, outlier tokens), which keep their own activations.
    ``fn(activations)``, or for paired data ``fn(activations, inputs)`` with the inputs read earlier in the same
    pass, as the returned function is called."""
    if every_position:  # SAEBench's and SAELens's: BOS and the outliers are replaced too
        return fn
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


def edited_losses(lm: torch.nn.Module, tokens: Tensor, batch_size: int,
                  edits: dict[str, Callable[[], ContextManager[Any]]]) -> dict[str, tuple[Tensor, Tensor]]:
    """For the clean LM (``"clean"``) and under each edit (name -> a factory of the context in which a forward pass is
    edited), the per-context next-token losses and KL divergences from the clean LM's next-token distributions
    (float64, on the CPU, ``(contexts,)`` each: means over each context's positions) of ``tokens``, ``batch_size``
    contexts a pass. The clean pass is run once per chunk of contexts, beside the edits."""
    parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {name: ([], []) for name in ("clean", *edits)}
    for chunk in tokens.split(batch_size):
        clean = lm_logits(lm, chunk)
        clean_logprobs = clean.float().log_softmax(-1)
        parts["clean"][0].append(token_losses(clean, chunk).mean(-1))
        parts["clean"][1].append(torch.zeros(len(chunk), device=clean.device))
        del clean
        for name, edit in edits.items():
            with edit():
                logits = lm_logits(lm, chunk)
            parts[name][0].append(token_losses(logits, chunk).mean(-1))
            parts[name][1].append(token_kl(clean_logprobs, logits).mean(-1))
    return {name: (torch.cat(ce).double().cpu(), torch.cat(kl).double().cpu()) for name, (ce, kl) in parts.items()}


def _passes(datamodule: LanguageModelData, edits: dict[str, Callable[..., Tensor]],
            every_position: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`edited_losses` on the ``ce_contexts`` held-out contexts, each edit (name -> ``fn``, spliced in by
    :func:`_splice`) at the hook the data write."""
    tokens, _, _ = datamodule.ce_batches()
    lm, _, hook = datamodule.language_model()
    reads = hook if datamodule.paired else None
    target = datamodule.target_hook

    def editing(fn: Callable[..., Tensor]) -> Callable[[], ContextManager[Any]]:
        replace = _splice(fn, datamodule, every_position)
        return lambda: intercept(target, replace) if reads is None else transcoding(reads, target, replace)

    return edited_losses(lm, tokens, datamodule.model_batch_size, {name: editing(fn) for name, fn in edits.items()})


def _score(clean: Tensor, edited: Tensor, ablation: Tensor, weights: Tensor) -> Tensor:
    """``(ablation - edited) / (ablation - clean)`` of contexts weighted by ``weights``: how much of what the
    ablation loses the edit keeps (CE-loss recovered; the KL score with ``clean`` zero)."""
    return (weights @ (ablation - edited)) / (weights @ (ablation - clean))


@dataclass(frozen=True)
class CELosses:
    """Per-context next-token losses (float64, ``(ce_contexts,)``) on the ``ce_contexts`` held-out contexts:
    ``clean``, with the activations the model writes zeroed (``zero_ablation``) and replaced by their mean
    (``mean_ablation``), and, once a model is measured, with its output spliced in (``spliced``); and the ``kl_*``
    twins: each edit's KL divergence from the clean LM's next-token distributions, a mean over positions.
    ``every_position``: whether every position was edited (SAEBench's), or only those the data hold (BOS and
    outlier tokens kept; sae_zoo's default)."""

    clean: Tensor
    zero_ablation: Tensor
    spliced: Tensor | None = None
    mean_ablation: Tensor | None = None
    kl_zero_ablation: Tensor | None = None
    kl_mean_ablation: Tensor | None = None
    kl_spliced: Tensor | None = None
    every_position: bool = False

    def recovered(self, weights: Tensor, ablation: Tensor | None = None) -> Tensor:
        """CE-loss recovered of contexts weighted by ``weights`` (``(..., contexts)``), against ``ablation``
        (zero ablation by default): ``(CE_ablation - CE_spliced) / (CE_ablation - CE_clean)``, SAELens's and
        SAEBench's ``ce_loss_score``."""
        return _score(self.clean, self.spliced, self.zero_ablation if ablation is None else ablation, weights)

    def kl_score(self, weights: Tensor, ablation: Tensor | None = None) -> Tensor:
        """The KL score of contexts weighted by ``weights``, against ``ablation`` (the zero ablation's KL by default):
        ``(KL_ablation - KL_spliced) / KL_ablation``, SAELens's and SAEBench's ``kl_div_score``."""
        ablation = self.kl_zero_ablation if ablation is None else ablation
        return _score(torch.zeros_like(ablation), self.kl_spliced, ablation, weights)

    def figures(self) -> dict[str, float]:
        """The mean losses, CE-loss recovered against zero ablation (``ce_loss_recovered``) and against mean ablation
        (``ce_loss_recovered_vs_mean``), and the KL score likewise (``kl_div_score``, ``kl_div_score_vs_mean``, with
        the mean KL divergences), each with its standard error by bootstrap over contexts."""
        means = {"ce_clean": float(self.clean.mean()), "ce_zero_ablation": float(self.zero_ablation.mean()),
                 "ce_spliced": float(self.spliced.mean())}
        ablations = [("", self.zero_ablation, self.kl_zero_ablation)]
        if self.mean_ablation is not None:
            means["ce_mean_ablation"] = float(self.mean_ablation.mean())
            ablations.append(("_vs_mean", self.mean_ablation, self.kl_mean_ablation))
        for suffix, ablation, kl_ablation in ablations:
            def recovered(weights: Tensor, ablation: Tensor = ablation) -> Tensor:
                return self.recovered(weights, ablation)

            gap = float(ablation.mean()) - means["ce_clean"]
            means[f"ce_loss_recovered{suffix}"] = float(recovered(torch.ones_like(self.clean))) if gap else float("nan")
            means[f"ce_loss_recovered{suffix}_se"] = bootstrap_se(recovered, len(self.clean)) if gap else float("nan")
            if kl_ablation is None or self.kl_spliced is None:
                continue  # losses measured before the KL score was

            def kl_score(weights: Tensor, ablation: Tensor = kl_ablation) -> Tensor:
                return self.kl_score(weights, ablation)

            name = "zero_ablation" if not suffix else "mean_ablation"
            means[f"kl_div_{name}"] = float(kl_ablation.mean())
            kl_gap = float(kl_ablation.mean())
            means[f"kl_div_score{suffix}"] = float(kl_score(torch.ones_like(self.clean))) if kl_gap else float("nan")
            means[f"kl_div_score{suffix}_se"] = bootstrap_se(kl_score, len(self.clean)) if kl_gap else float("nan")
        if self.kl_spliced is not None:
            means["kl_div_spliced"] = float(self.kl_spliced.mean())
        means["ce_contexts"] = len(self.clean)
        means["ce_every_position"] = self.every_position
        return means


@torch.no_grad()
def ce_baselines(datamodule: LanguageModelData, every_position: bool = False) -> CELosses:
    """Per-context next-token losses and KL divergences, clean, with the written activations (the targets' hook: an
    MLP's output for a transcoder) zeroed, and with them replaced by their mean over training tokens, on the
    ``ce_contexts`` held-out contexts: what every model's CE-loss recovered and KL score are measured against.
    ``every_position``: edit BOS and the outlier tokens too (SAEBench's core does), not only the tokens the data
    hold."""
    mean = datamodule.target_mean

    def mean_ablated(acts: Tensor, *inputs: Tensor) -> Tensor:
        return mean.to(acts.device, acts.dtype).expand_as(acts)

    def zeroed(acts: Tensor, *inputs: Tensor) -> Tensor:
        return torch.zeros_like(acts)

    passes = _passes(datamodule, {"zero": zeroed, "mean": mean_ablated}, every_position)
    return CELosses(clean=passes["clean"][0], zero_ablation=passes["zero"][0], mean_ablation=passes["mean"][0],
                    kl_zero_ablation=passes["zero"][1], kl_mean_ablation=passes["mean"][1],
                    every_position=every_position)


@torch.no_grad()
def ce_spliced(coder: SparseCoder, datamodule: LanguageModelData, baselines: CELosses | None = None,
               every_position: bool | None = None) -> CELosses:
    """``baselines`` (:func:`ce_baselines`, computed when not given) with the per-context losses and KL divergences
    with the written activations replaced by ``coder``'s output (see :func:`ce_loss_recovered`): an SAE's
    reconstruction of them, a transcoder's prediction of them from its inputs (the MLP replaced). The positions
    edited are the baselines' (``every_position``, which must agree with theirs when given)."""
    check_pairing(coder, datamodule)
    if baselines is None:
        baselines = ce_baselines(datamodule, bool(every_position))
    elif every_position is not None and every_position != baselines.every_position:
        raise ValueError(f"every_position={every_position}, but the baselines edited "
                         f"{'every position' if baselines.every_position else 'the positions the data hold'}: "
                         "measure both alike")
    device = next(coder.parameters(), torch.empty(0)).device
    scale, target_scale = datamodule.scale, datamodule.target_scale

    def output(acts: Tensor, *inputs: Tensor) -> Tensor:
        x = inputs[0] if inputs else acts
        y_hat, _ = coder((x.float() * scale).to(device))
        return (y_hat / target_scale).to(acts.dtype).to(acts.device)

    with evaluating(coder):  # inference behaviour (an iterative head solves instead of returning its warm start)
        spliced, kl = _passes(datamodule, {"spliced": output}, baselines.every_position)["spliced"]
    return dataclasses.replace(baselines, spliced=spliced, kl_spliced=kl)


def ce_loss_recovered(coder: SparseCoder, datamodule: LanguageModelData, baselines: CELosses | None = None,
                      every_position: bool | None = None) -> dict[str, float]:
    """CE-loss recovered on the datamodule's ``ce_contexts`` held-out contexts: the LM's next-token loss with the
    activations the model writes (its input for an SAE; the targets' hook, e.g. an MLP's output, for a transcoder)
    replaced by ``coder``'s output, against the clean loss and the loss with them zeroed:
    ``1 - (CE_replaced - CE_clean) / (CE_zero - CE_clean)``, and the same against mean ablation, each with its
    standard error by bootstrap over contexts; and the KL score, ``1 - KL_replaced / KL_zero`` (the KL divergence
    from the clean next-token distributions), likewise. Positions left out of the data (BOS, outlier tokens) keep
    their own activations in the spliced and the ablated runs, unless ``every_position`` (SAEBench's core, which
    edits every position). ``baselines`` (:func:`ce_baselines`) saves the clean and ablated passes when many models
    are measured on the same data."""
    return ce_spliced(coder, datamodule, baselines, every_position).figures()
