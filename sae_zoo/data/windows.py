"""Windows of whole documents, read through an activation datamodule's language model at its hook: the
texts that sparse probing labels and feature dashboards show. A few windows are taken from each document,
evenly spaced through it (one window is the middle one), so that a few hundred windows cover many documents
rather than the first few. They are read once and cached in the activation cache's folder
(``<kind>-<key>/windows.safetensors``, written to a temporary file and renamed)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .._io import atomic_write, cache_key
from .activations import outlier_mask
from .base import LanguageModelData


class Windows(NamedTuple):
    """``tokens`` ``(windows, context_len)`` (BOS first when the data prepend it), ``activations``
    ``(windows, tokens kept, d_model)`` as read, unscaled (BOS left out when the data leave it out), and
    ``documents`` ``(windows,)``: the index of each window's document."""

    tokens: Tensor
    activations: Tensor
    documents: Tensor


def centred_windows(n_tokens: int, body: int, count: int) -> list[int]:
    """Start offsets of ``count`` windows of ``body`` tokens, evenly spaced through ``n_tokens`` tokens."""
    n = n_tokens // body
    count = min(n, count)
    return [(2 * i + 1) * n // (2 * count) * body for i in range(count)]


def read_windows(datamodule: LanguageModelData, kind: str, texts: Iterable[str], per_document: int,
                 context_len: int | None = None, limit: int | None = None,
                 identity: dict[str, Any] | None = None) -> Windows:
    """Up to ``per_document`` windows of ``context_len`` tokens (default: the data's) from each text, at most
    ``limit`` in all, read at the datamodule's hook. Cached under ``kind`` and ``identity`` (what the texts
    are: a file list's hash, a dataset's name), with the LM and window layout."""
    context_len = context_len or datamodule.context_len
    key_fields = dict(datamodule.window_identity)
    key_fields.update(identity or {}, kind=kind, context_len=context_len, per_document=per_document, limit=limit)
    key = cache_key(key_fields)
    path = datamodule.cache_dir / f"{kind}-{key}" / "windows.safetensors"
    if path.exists():
        return Windows(**load_file(str(path)))
    _, tokenizer, _ = datamodule.language_model()
    body = context_len - datamodule.prepend_bos
    windows, documents = [], []
    for index, text in enumerate(tqdm(texts, desc=f"{kind} texts", unit="doc", disable=None)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in centred_windows(len(ids), body, per_document)[: None if limit is None else limit - len(windows)]:
            windows.append(torch.tensor(([tokenizer.bos_token_id] if datamodule.prepend_bos else []) + ids[start:start + body]))
            documents.append(index)
        if limit is not None and len(windows) >= limit:
            break
    if not windows:
        raise ValueError(f"{kind}: no text holds a window of {context_len} tokens")
    tokens = torch.stack(windows)
    acts = datamodule.read_contexts(tokens)
    out = Windows(tokens, acts.to(getattr(torch, key_fields.get("cache_dtype", "float32"))), torch.tensor(documents))
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in out._asdict().items()}, str(tmp)))
    return out


@torch.no_grad()
def encode_windows(model: Any, windows: Windows, scale: float, outlier_norm: float | None,
                   batch_tokens: int = 4096) -> tuple[Tensor, Tensor]:
    """``(codes, outlier mask (windows, tokens))``: the codes of the scaled activations as a sparse
    ``(windows * tokens, n_latents)`` tensor, zero at the outlier tokens, which the data leave out."""
    x = windows.activations.float() * scale
    outliers = outlier_mask(x, outlier_norm)
    chunks = []
    for chunk, out in zip(x.flatten(0, 1).split(batch_tokens), outliers.flatten().split(batch_tokens)):
        codes = model.encode(chunk.to(model.device)).float().cpu()
        chunks.append(codes.masked_fill_(out[:, None], 0).to_sparse())
    return torch.cat(chunks).coalesce(), outliers


def columns(codes: Tensor, latents: list[int], shape: torch.Size) -> Tensor:
    """The dense ``(windows, tokens, len(latents))`` codes of ``latents`` from :func:`encode_windows`' codes."""
    return codes.index_select(1, torch.tensor(latents)).to_dense().view(*shape, len(latents))


def token_text(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"
