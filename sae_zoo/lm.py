"""Language models for activation data: load one, find a hook point, read activations there, and
splice reconstructions back in to measure the CE loss an SAE preserves.

Hook points are module paths (``model.layers.15``: the module's output; ``layers.15``, relative to the base
model as sparsify names them, works too; ``.input`` or ``.output`` after a path names that side, as Gemma Scope 2's
``hf_hook_point_in`` does) or aliases over the model's
stack of blocks (found as the ``ModuleList`` with ``num_hidden_layers`` entries, e.g. ``model.layers``
for Llama, ``transformer.h`` for GPT-2): ``resid_post.L`` (output of block L), ``resid_pre.L`` (its
input), ``mlp_in.L`` and ``mlp_out.L`` (the input of block L's MLP, after its norm and gain, and the MLP's
output: a transcoder's pair), and SAELens's names for the same places (``blocks.L.hook_resid_post``,
``blocks.L.hook_resid_pre``, ``blocks.L.hook_mlp_out``). TransformerLens's ``blocks.L.ln2.hook_normalized``
(before the norm's gain) and ``blocks.L.hook_mlp_in`` (before the norm) are other activations than the MLP's
input, so they are no aliases of ``mlp_in.L``.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
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


    def same_place(self, other: HookPoint) -> bool:
        return (self.path, self.side) == (other.path, other.side)


#: aliases over the stack of blocks: (pattern giving the layer, the block's child it names or None, side)
_ALIASES = [(re.compile(r"^(?:resid_post\.|blocks\.)(\d+)(?:\.hook_resid_post)?$"), None, "output"),
            (re.compile(r"^(?:resid_pre\.(\d+)|blocks\.(\d+)\.hook_resid_pre)$"), None, "input"),
            (re.compile(r"^mlp_in\.(\d+)$"), "mlp", "input"),
            (re.compile(r"^(?:mlp_out\.(\d+)|blocks\.(\d+)\.hook_mlp_out)$"), "mlp", "output")]
#: what a block's MLP is called in the transformers models that have one
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def find_mlp(block: nn.Module, where: str) -> tuple[str, nn.Module]:
    """``(name, module)`` of a block's MLP: its child called one of :data:`MLP_NAMES`."""
    for name in MLP_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name, getattr(block, name)
    raise ValueError(f"{where} ({type(block).__name__}) has no MLP child named {', '.join(MLP_NAMES)}; its children "
                     f"are {', '.join(n for n, _ in block.named_children())}: name the module to hook by its path")


def resolve_hook(lm: nn.Module, hook: str) -> HookPoint:
    """The hook point ``hook`` names; an unknown name raises a ``ValueError`` listing close matches."""
    modules = dict(lm.named_modules())
    path, dot, side = hook.rpartition(".")
    path, side = (path, side) if dot and side in ("input", "output") and hook not in modules else (hook, "output")
    # names relative to the base model, as sparsify writes them (layers.3 is model.layers.3 of a Llama)
    prefix = getattr(lm, "base_model_prefix", "")
    for full in (path, f"{prefix}.{path}"):
        if path and full in modules:
            return HookPoint(hook, full, modules[full], side)
    blocks = find_blocks(lm)
    for pattern, child, side in _ALIASES:
        match = pattern.match(hook)
        if match and blocks is not None:
            layer = int(next(g for g in match.groups() if g is not None))
            prefix, stack = blocks
            if not 0 <= layer < len(stack):
                raise ValueError(f"hook {hook!r}: the model has blocks 0..{len(stack) - 1} ({prefix})")
            if child is None:
                return HookPoint(hook, f"{prefix}.{layer}", stack[layer], side)
            name, module = find_mlp(stack[layer], f"hook {hook!r}: block {prefix}.{layer}")
            return HookPoint(hook, f"{prefix}.{layer}.{name}", module, side)
    aliases = [f"{alias}.{i}" for alias in ("resid_post", "resid_pre", "mlp_in", "mlp_out")
               for i in range(len(blocks[1]))] if blocks else []
    close = difflib.get_close_matches(hook, list(modules) + aliases, n=5, cutoff=0.5)
    raise ValueError(f"hook {hook!r} is not a module of {type(lm).__name__} nor an alias"
                     + (f"; close matches: {', '.join(close)}" if close else "")
                     + (f"; blocks are {blocks[0]}.0..{len(blocks[1]) - 1} (aliases resid_post.L, resid_pre.L, "
                        "mlp_in.L, mlp_out.L)" if blocks else ""))


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


@contextmanager
def transcoding(reads: HookPoint, writes: HookPoint, fn: Callable[[Tensor, Tensor], Tensor | None], *,
                stop: bool = False) -> Iterator[None]:
    """Call ``fn(activations at writes, activations at reads)`` at ``writes`` during forward passes, with the
    activations ``reads`` saw earlier in the same pass (a transcoder reads an MLP's input and writes its output);
    a tensor it returns replaces those at ``writes``. ``stop=True`` ends the pass right after."""
    seen: list[Tensor] = []

    def at_writes(activations: Tensor) -> Tensor | None:
        if not seen:
            raise ValueError(f"hook_out {writes.name!r} comes before hook {reads.name!r} in the forward pass: a "
                             "transcoder reads the earlier hook and writes the later one")
        return fn(activations, seen.pop())

    with intercept(reads, seen.append), intercept(writes, at_writes, stop=stop):
        yield


@torch.no_grad()
def read_pair(lm: nn.Module, reads: HookPoint, writes: HookPoint, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Activations ``(batch, context, width)`` at ``reads`` and at ``writes`` (a later hook) for ``tokens``; the
    forward pass stops at ``writes``."""
    captured: list[tuple[Tensor, Tensor]] = []
    with transcoding(reads, writes, lambda out, inp: captured.append((inp.detach(), out.detach())), stop=True):
        try:
            lm(tokens.to(lm.device))
        except _StopForward:
            pass
    return captured[0]


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
def read_many(lm: nn.Module, hooks: list[HookPoint], tokens: Tensor) -> list[Tensor]:
    """Activations ``(batch, context, width)`` at each of ``hooks`` for ``tokens``, from one forward pass that stops
    once the last of them has been read."""
    captured: dict[int, Tensor] = {}

    def reader(i: int) -> Callable[[Tensor], None]:
        def read(activations: Tensor) -> None:
            captured[i] = activations.detach()
            if len(captured) == len(hooks):
                raise _StopForward
        return read

    with ExitStack() as stack:
        for i, hook in enumerate(hooks):
            stack.enter_context(intercept(hook, reader(i)))
        try:
            lm(tokens.to(lm.device))
        except _StopForward:
            pass
    return [captured[i] for i in range(len(hooks))]


@torch.no_grad()
def lm_logits(lm: nn.Module, tokens: Tensor, hook: HookPoint | None = None,
              replace: Callable[..., Tensor] | None = None, *, reads: HookPoint | None = None) -> Tensor:
    """The LM's logits ``(n, len, vocab)`` for ``tokens`` ``(n, len)``, with the hook's activations replaced by
    ``replace(activations)`` when given, or by ``replace(activations, activations at reads)`` when an earlier hook
    ``reads`` is given (a transcoder's)."""
    tokens = tokens.to(lm.device)
    with ExitStack() as edits:
        if replace is not None:
            edits.enter_context(intercept(hook, replace) if reads is None else transcoding(reads, hook, replace))
        return lm(tokens).logits


def token_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy at each position but the last, ``(n, len - 1)``, of ``logits`` ``(n, len, vocab)``."""
    tokens = tokens.to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    return losses.reshape(tokens.shape[0], -1)


def token_kl(clean_logprobs: Tensor, logits: Tensor) -> Tensor:
    """``KL(clean || new)`` of the next-token distributions at every position, ``(n, len)``: the clean log-probs
    (``log_softmax`` of the clean logits, float32) against the new ``logits`` (SAELens's ``_kl``)."""
    new = logits.float().log_softmax(-1)
    return (clean_logprobs.exp() * (clean_logprobs - new)).sum(-1)
