"""Transcoders judged as a replacement model: a cross-layer transcoder, or a set of per-layer transcoders, replaces
every MLP of its span at once. Each layer's output is then computed from that layer's input in the edited forward
pass (a CLT's latents read at each layer as the pass reaches it, and write that layer and every later one), so the
CE loss measures the replacement model's error, which is what an attribution graph built on it inherits.

Both kinds of model are :class:`Replacement` s: ``start()`` before a pass, then ``step(layer, x)`` layer by layer,
giving that layer's output and codes from its (scaled) input. Figures: FVU of every layer's MLP output on the held-out
tokens (each with its standard error by bootstrap over contexts), the summed L0, and CE-loss recovered with every MLP
replaced, against zeroing all of them and against replacing each by its mean output.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from .._modes import evaluating
from ..clt import CrossLayerTranscoder, hook_layer
from ..data.activations import any_outlier
from ..data.base import split_batch
from ..lm import transcoding
from ..model import SparseCoder
from .bootstrap import bootstrap_se
from .held_out import ContextSums
from .language_model import CELosses, edited_losses


class Replacement:
    """Layer by layer outputs of a model that replaces a span of MLPs (see the module docstring)."""

    n_layers: int

    def start(self) -> None:
        """Before a new forward pass."""

    def step(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, codes)`` of span layer ``layer`` (0-based) from its scaled inputs ``x`` ``(n, d_in)``."""
        raise NotImplementedError


class CLTReplacement(Replacement):
    """A CLT, layer by layer: each layer's codes are decoded into that layer and every later one at once."""

    def __init__(self, clt: CrossLayerTranscoder) -> None:
        self.clt, self.n_layers = clt, clt.n_layers
        self.pending: Tensor | None = None

    def start(self) -> None:
        self.pending = None

    def step(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        clt = self.clt
        codes = clt.encoders[layer](x)
        written = clt.decoder.decode_layer(layer, codes).view(len(x), clt.n_layers - layer, clt.d_out)
        if self.pending is None:
            self.pending = written.new_zeros(len(x), clt.n_layers, clt.d_out)
        self.pending[:, layer:] += written
        out = self.pending[:, layer] + clt.decoder.b_dec[layer]
        if clt.W_skip is not None:
            out = out + x @ clt.W_skip[layer]
        return out, codes


class TranscoderSet(Replacement):
    """Per-layer transcoders, one per layer of the span, in order."""

    def __init__(self, models: Sequence[SparseCoder]) -> None:
        self.models, self.n_layers = list(models), len(models)

    def step(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.models[layer](x)
        return out.x_hat, out.codes


def replacement_of(model: CrossLayerTranscoder | Sequence[SparseCoder] | Replacement) -> Replacement:
    if isinstance(model, Replacement):
        return model
    return CLTReplacement(model) if isinstance(model, CrossLayerTranscoder) else TranscoderSet(model)


@contextmanager
def evaluating_all(*replacements: Replacement) -> Iterator[None]:
    """The replacements' modules in inference mode (:func:`~sae_zoo._modes.evaluating`) for the block."""
    with ExitStack() as stack:
        for replacement in replacements:
            clt = isinstance(replacement, CLTReplacement)
            modules = [replacement.clt] if clt else getattr(replacement, "models", [])
            for module in modules:
                stack.enter_context(evaluating(module))
        yield


def held_out_layers(data: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, target, context, outlier)`` of every held-out token of a several-hook datamodule
    (:class:`~sae_zoo.data.multi_hook.MultiHookData`, one part per layer, in order): ``x`` and ``target``
    ``(tokens, n_layers, width)``, scaled, aligned across layers; each token's context; and whether it is an outlier
    at any layer (the data leave those out of training)."""
    parts = list(data.parts.values())
    xs, targets = [], []
    for part in parts:
        x, target = zip(*(split_batch(b)[:2] for b in part.held_out_rows()))
        xs.append(torch.cat(x))
        targets.append(torch.cat(target))
    x, target = torch.stack(xs, 1), torch.stack(targets, 1)
    bounds = [b for part in parts for b in (part.outlier_norm, part.target_outlier_norm)]
    outlier = any_outlier([side for i in range(len(parts)) for side in (x[:, i], target[:, i])], bounds)
    context = torch.arange(len(x)) // parts[0].tokens_per_context
    return x, target, context, outlier


def span_blocks(data: Any) -> list[int | str]:
    """The block each part of a several-hook datamodule reads (its input hook's number; its position where the hook
    names none)."""
    return [hook_layer(part.hparams.hook) if hook_layer(part.hparams.hook) is not None else i
            for i, part in enumerate(data.parts.values())]


@torch.no_grad()
def replacement_fvu(model: Any, data: Any, chunk: int = 4096) -> dict[str, Any]:
    """FVU of every layer's MLP output on the held-out tokens (outliers left out; ``fvu_layer_{block}``), each with its
    standard error by bootstrap over contexts, their mean, the summed L0 (over layers, per token) and the share of
    dead latents."""
    replacement = replacement_of(model)
    x, target, context, outlier = held_out_layers(data)
    keep = ~outlier
    x, target, context = x[keep], target[keep], context[keep]
    n_contexts = int(context.max()) + 1 if len(context) else 0
    sums = [ContextSums.zeros(n_contexts, target.shape[-1]) for _ in range(replacement.n_layers)]
    l0, fired = torch.zeros(replacement.n_layers, dtype=torch.float64), None
    with evaluating_all(replacement):
        for start in range(0, len(x), chunk):
            rows = slice(start, start + chunk)
            replacement.start()
            for layer in range(replacement.n_layers):
                out, codes = replacement.step(layer, x[rows, layer])
                sums[layer].add(context[rows], target[rows, layer].double(), out.double())
                l0[layer] += (codes != 0).sum().double()
                active = (codes != 0).any(0)
                if fired is None:
                    fired = torch.zeros(replacement.n_layers, codes.shape[-1], dtype=torch.bool)
                fired[layer] |= active
    ones = torch.ones(n_contexts, dtype=torch.float64)
    figures: dict[str, Any] = {"tokens": len(x), "contexts": n_contexts}
    for block, s in zip(span_blocks(data), sums):
        figures[f"fvu_layer_{block}"] = float(s.fvu(ones))
        figures[f"fvu_layer_{block}_se"] = bootstrap_se(s.fvu, n_contexts)

    def mean_fvu(weights: Tensor) -> Tensor:
        return torch.stack([s.fvu(weights) for s in sums]).mean(0)

    figures["fvu_mean"], figures["fvu_mean_se"] = float(mean_fvu(ones)), bootstrap_se(mean_fvu, n_contexts)
    figures["l0_per_layer"] = (l0 / max(1, len(x))).tolist()
    figures["l0_summed"] = float(l0.sum() / max(1, len(x)))
    figures["dead_fraction"] = float(1 - fired.float().mean()) if fired is not None else float("nan")
    return figures


def _span_passes(data: Any, edits: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-context next-token losses and KL divergences from the clean LM on the held-out CE contexts
    (:func:`~sae_zoo.evaluation.language_model.edited_losses`), for each edit (name -> ``"zero"``, ``"mean"`` or a
    :class:`Replacement`) applied at every layer of the span at once."""
    parts = list(data.parts.values())
    first = parts[0]
    tokens, _, keep_first = first.ce_batches()
    lm, _, _ = first.language_model()
    hooks = [(part.language_model()[2], part.target_hook, part) for part in parts]

    @contextmanager
    def editing(edit: Any) -> Iterator[None]:
        if isinstance(edit, Replacement):
            edit.start()
        with ExitStack() as stack:
            for layer, (reads, writes, part) in enumerate(hooks):
                stack.enter_context(transcoding(reads, writes, _layer_edit(edit, layer, part, keep_first)))
            yield

    return edited_losses(lm, tokens, first.model_batch_size,
                         {name: functools.partial(editing, edit) for name, edit in edits.items()})


def _layer_edit(edit: Any, layer: int, part: Any, keep_first: bool):
    def replace(acts: Tensor, inputs: Tensor) -> Tensor:
        if edit == "zero":
            new = torch.zeros_like(acts)
        elif edit == "mean":
            new = part.target_mean.to(acts.device, acts.dtype).expand_as(acts)
        else:
            x = inputs.float() * part.scale
            out, _ = edit.step(layer, x.reshape(-1, x.shape[-1]))
            new = (out.reshape(*acts.shape[:-1], -1) / part.target_scale).to(acts.dtype)
        if keep_first:  # BOS positions were not in the data: they keep their own MLP outputs
            new = torch.cat([acts[:, :1], new[:, 1:]], dim=1)
        return new
    return replace


@torch.no_grad()
def replacement_ce(models: dict[str, Any], data: Any) -> dict[str, dict[str, float]]:
    """CE-loss recovered and the KL score (:class:`~sae_zoo.evaluation.language_model.CELosses`' figures, with their
    standard errors) of each model (name -> a CLT, a list of per-layer transcoders, or a :class:`Replacement`) with
    every MLP of the span replaced at once, against zeroing them all and against each one's mean output; measured on
    the same held-out contexts in one run, so the models' figures pair."""
    replacements = {name: replacement_of(model) for name, model in models.items()}
    with evaluating_all(*replacements.values()):
        passes = _span_passes(data, {"zero": "zero", "mean": "mean", **replacements})
    base = CELosses(clean=passes["clean"][0], zero_ablation=passes["zero"][0], mean_ablation=passes["mean"][0],
                    kl_zero_ablation=passes["zero"][1], kl_mean_ablation=passes["mean"][1])
    return {name: CELosses(**{**base.__dict__, "spliced": passes[name][0], "kl_spliced": passes[name][1]}).figures()
            for name in replacements}
