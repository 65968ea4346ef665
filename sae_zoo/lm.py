"""Language models for activation data: load one, find a hook point, read activations there, and
splice reconstructions back in to measure the CE loss an SAE preserves.

Hook points are module paths (``model.layers.15``: the module's output; ``layers.15``, relative to the base
model as sparsify names them, works too) or aliases over the model's
stack of blocks (found as the ``ModuleList`` with ``num_hidden_layers`` entries, e.g. ``model.layers``
for Llama, ``transformer.h`` for GPT-2): ``resid_post.L`` (output of block L), ``resid_pre.L`` (its
input), and SAELens's ``blocks.L.hook_resid_post`` / ``blocks.L.hook_resid_pre``.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE_PREFIX = "package:"


def resolve_package_path(spec: str) -> str:
    """``package:NAME/rel/path`` -> the path inside the installed package ``NAME`` (models and corpora
    shipped on PyPI); any other string is returned unchanged."""
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    name, _, rest = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec!r}: the package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return str(Path(list(found.submodule_search_locations)[0]) / rest)


@functools.lru_cache(maxsize=2)  # the runs of a suite share one model
def load_language_model(model: str, *, gguf_file: str | None = None, revision: str | None = None,
                        dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """``(causal LM in eval mode, frozen; tokenizer)`` from a Hub id, a local directory, or
    ``package:NAME`` (with ``gguf_file`` for a GGUF checkpoint, which transformers dequantises to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_package_path(model)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    return lm.to(device).eval().requires_grad_(False), tokenizer


def max_context(lm: nn.Module) -> int | None:
    config = lm.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def find_blocks(lm: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of transformer blocks: the ``ModuleList`` holding ``num_hidden_layers`` modules."""
    n = getattr(lm.config, "num_hidden_layers", None)
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    return None


@dataclass
class HookPoint:
    """Where activations are read: the ``input`` or ``output`` of ``module`` (named ``path``)."""

    name: str
    path: str
    module: nn.Module
    side: str  # "input" or "output"


_ALIASES = [(re.compile(r"^(?:resid_post\.|blocks\.)(\d+)(?:\.hook_resid_post)?$"), "output"),
            (re.compile(r"^(?:resid_pre\.(\d+)|blocks\.(\d+)\.hook_resid_pre)$"), "input")]


def resolve_hook(lm: nn.Module, hook: str) -> HookPoint:
    """The hook point ``hook`` names; an unknown name raises a ``ValueError`` listing close matches."""
    modules = dict(lm.named_modules())
    if hook in modules and hook:
        return HookPoint(hook, hook, modules[hook], "output")
    # names relative to the base model, as sparsify writes them (layers.3 is model.layers.3 of a Llama)
    prefix = getattr(lm, "base_model_prefix", "")
    if hook and f"{prefix}.{hook}" in modules:
        return HookPoint(hook, f"{prefix}.{hook}", modules[f"{prefix}.{hook}"], "output")
    blocks = find_blocks(lm)
    for pattern, side in _ALIASES:
        match = pattern.match(hook)
        if match and blocks is not None:
            layer = int(next(g for g in match.groups() if g is not None))
            prefix, stack = blocks
            if not 0 <= layer < len(stack):
                raise ValueError(f"hook {hook!r}: the model has blocks 0..{len(stack) - 1} ({prefix})")
            return HookPoint(hook, f"{prefix}.{layer}", stack[layer], side)
    aliases = [f"resid_post.{i}" for i in range(len(blocks[1]))] + [f"resid_pre.{i}" for i in range(len(blocks[1]))] \
        if blocks else []
    close = difflib.get_close_matches(hook, list(modules) + aliases, n=5, cutoff=0.5)
    raise ValueError(f"hook {hook!r} is not a module of {type(lm).__name__} nor an alias"
                     + (f"; close matches: {', '.join(close)}" if close else "")
                     + (f"; blocks are {blocks[0]}.0..{len(blocks[1]) - 1} (aliases resid_post.L, resid_pre.L)"
                        if blocks else ""))


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the activations it needs are read."""


def _output_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def intercept(hook: HookPoint, fn: Callable[[Tensor], Tensor | None], *, stop: bool = False) -> Iterator[None]:
    """Call ``fn(activations)`` at the hook during forward passes; a tensor it returns replaces the
    activations. ``stop=True`` ends the forward pass right after (for reading activations only)."""

    def apply(activations: Tensor) -> Tensor | None:
        replaced = fn(activations)
        if stop:
            raise _StopForward
        return replaced

    if hook.side == "output":
        def on_output(module: nn.Module, args: Any, output: Any) -> Any:
            new = apply(_output_tensor(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = hook.module.register_forward_hook(on_output)
    else:
        def on_input(module: nn.Module, args: Any, kwargs: dict) -> Any:
            if args:
                new = apply(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = apply(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = hook.module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def read_activations(lm: nn.Module, hook: HookPoint, tokens: Tensor) -> Tensor:
    """Activations ``(batch, context, d_model)`` at ``hook`` for ``tokens`` ``(batch, context)``; the
    forward pass stops at the hook."""
    captured: list[Tensor] = []
    with intercept(hook, lambda a: captured.append(a.detach()), stop=True):
        try:
            lm(tokens.to(lm.device))
        except _StopForward:
            pass
    return captured[0]


@torch.no_grad()
def next_token_loss(lm: nn.Module, tokens: Tensor, hook: HookPoint | None = None,
                    replace: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Next-token cross-entropy of each context of ``tokens`` ``(n, len)``, a mean over its positions
    (shape ``(n,)``), with the hook's activations replaced by ``replace(activations)`` when given."""
    tokens = tokens.to(lm.device)
    if replace is None:
        logits = lm(tokens).logits
    else:
        with intercept(hook, replace):
            logits = lm(tokens).logits
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return losses.reshape(tokens.shape[0], -1).mean(-1)
