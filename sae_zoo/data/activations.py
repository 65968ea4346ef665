"""Activations of a language model as training data: read from the LM while it trains (``cache=False``, the
default: :mod:`sae_zoo.data.live`), or collected once into an on-disk cache (``cache=True``) that later runs on the
same tokens read again without the LM.

Either way the held-out contexts are collected once into a small cache folder, with the statistics every run on
these data shares (the normalisation scale, the outlier bound, the mean target for mean ablation). The cache's
layout:

``ActivationDataModule`` tokenises a text dataset (``datasets``) into fixed context windows, runs a
causal LM (``transformers``) over them under ``torch.no_grad()``, and writes the activations at a
hook point (and, for a transcoder, those at a second, later hook: its targets) to shards of a cache folder:

* ``manifest.json``: what was collected (model, revision, hook, dataset, context length, BOS
  handling, dtype, token counts), the activation width, the scale factor and the shards done.
* ``test-00000.safetensors``, ...: held-out activations (tensor ``activations``, one row per token, in
  ``cache_dtype``, bfloat16 included; tensor ``targets`` beside it, row for row, when the data pair each
  input with a target), whole contexts per shard; ``test-tokens-00000.safetensors``, ...:
  their token ids (tensor ``token_ids``, for the CE-loss evaluation).
* ``train-00000.safetensors``, ...: training activations (``cache=True`` only).
* ``stats.safetensors``: on the fly, the statistics of the first ``stats_tokens`` training tokens (tensor
  ``target_mean``; the scales and median norms are in the manifest).

Each shard is written to a temporary file and renamed, then the manifest is updated the same way;
an interrupted collection resumes after the last shard the manifest lists, so nothing is lost or
written twice. A cache whose manifest describes other data is refused. Collection holds a lock file
(``cache_dir/.lock``), so two processes pointed at one cache take turns instead of interleaving shards.
Training loads each shard whole when first needed (``benchmarks/cache_read.py``: at least as fast as
memory-mapped ``.npy`` shards with this access pattern, and bfloat16 needs no bit-casting), mixing rows
across a shuffle buffer of many contexts; each rank of a multi-device run reads only its slice of every
global batch, so N devices see exactly the batches one device would.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .._io import atomic_write, atomic_write_json, cache_key
from ..lm import (HookPoint, load_language_model, max_context, read_activations, read_pair, resolve_hook,
                  resolve_package_path)
from .base import LanguageModelData, Pair
from .live import LiveActivations, Reader
from .registry import register_datamodule
from .tokens import TOKEN_COLUMNS, text_windows, token_column, token_rows

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_DTYPES = ("float32", "float16", "bfloat16")
#: the cache's file layout; a cache written in another layout is refused (its manifest identity differs)
CACHE_FORMAT = "safetensors-1"
ACTIVATIONS, TARGETS, TOKEN_IDS = "activations", "targets", "token_ids"
STATS = "stats.safetensors"


def save_shard(path: Path, name: str, tensor: Tensor, **more: Tensor) -> None:
    """Tensors (``name``, and ``more`` by keyword) in a safetensors file, written to a temporary file and renamed."""
    tensors = {name: tensor, **more}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def load_shard(path: Path, name: str) -> Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def outlier_mask(x: Tensor, max_norm: float | None) -> Tensor:
    """Which rows of ``x`` (``(..., d)``) are outlier tokens: norm above ``max_norm`` (none when it is None)."""
    if max_norm is None:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    return x.norm(dim=-1) > max_norm


def any_outlier(parts: Sequence[Tensor], max_norms: Sequence[float | None]) -> Tensor:
    """Which rows are outlier tokens when rows of several tensors go together (a pair's input and target): any
    part's norm above its own bound (:func:`outlier_mask`)."""
    return torch.stack([outlier_mask(part, bound) for part, bound in zip(parts, max_norms)]).any(0)


def shard_rows(path: Path, name: str = ACTIVATIONS) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice(name).get_shape()[0])


def select(batch: Tensor | Pair, keep: Tensor) -> Tensor | Pair:
    """The rows ``keep`` of a batch or of both sides of a :class:`Pair`."""
    return Pair(batch.x[keep], batch.target[keep]) if isinstance(batch, Pair) else batch[keep]


class ShardedActivations(IterableDataset):
    """Batches of rows of safetensors shards (tensor ``activations``), as float32, scaled; with ``target_scale``,
    :class:`Pair` batches of the shards' ``activations`` and ``targets``, each scaled by its own factor.

    ``shuffle=True``: rows are permuted within consecutive windows of ``shuffle_buffer`` rows (fresh
    permutations every pass, seeded), grouped into global batches of ``batch_size`` (an incomplete last
    one is dropped), and this rank yields rows ``[rank * b / world, (rank + 1) * b / world)`` of each.
    ``shuffle=False``: rows in order, every batch split across ranks, nothing dropped. ``max_norm``: rows
    whose (scaled) norm exceeds it are left out of the batches (outlier tokens), so a batch may hold a
    few rows fewer; ``target_max_norm`` the same of the targets (a row is an outlier when either side is).
    ``drop_outliers=False`` serves every row; :meth:`outliers` still names the outliers.
    A shard is loaded whole when first needed; only the shards a window can touch stay in memory.
    """

    def __init__(self, files: list[Path], batch_size: int, *, scale: float = 1.0, shuffle: bool = False,
                 shuffle_buffer: int = 65536, seed: int = 0, rank: int = 0, world_size: int = 1,
                 max_norm: float | None = None, target_scale: float | None = None,
                 target_max_norm: float | None = None, drop_outliers: bool = True) -> None:
        if shuffle and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must divide evenly across {world_size} devices")
        self.files, self.batch_size = files, batch_size
        self.paired = target_scale is not None
        self.names = (ACTIVATIONS, TARGETS) if self.paired else (ACTIVATIONS,)
        self.scales, self.max_norms = (scale, target_scale), (max_norm, target_max_norm if self.paired else None)
        self.drop_outliers = drop_outliers
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, max(shuffle_buffer, batch_size), seed
        self.rank, self.world_size = rank, world_size
        lengths = [shard_rows(f) for f in files]
        self.offsets = np.cumsum([0] + lengths)
        # a window of shuffle_buffer rows (or a batch) touches at most this many consecutive shards
        self.keep = 1 + math.ceil(max(self.shuffle_buffer, batch_size) / max(1, min(lengths, default=1)))
        self._loaded: OrderedDict[int, tuple[Tensor, ...]] = OrderedDict()
        self.epoch = 0
        self.skip = 0  # batches of the next shuffled pass already trained on (a resumed run's)

    def _shard(self, index: int) -> tuple[Tensor, ...]:
        if index in self._loaded:
            self._loaded.move_to_end(index)
        else:
            with safe_open(str(self.files[index]), framework="pt") as handle:
                self._loaded[index] = tuple(handle.get_tensor(name) for name in self.names)
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        return self._loaded[index]

    def __len__(self) -> int:
        n = int(self.offsets[-1])
        return n // self.batch_size if self.shuffle else math.ceil(n / self.batch_size)

    @property
    def scale(self) -> float:
        return self.scales[0]

    @property
    def max_norm(self) -> float | None:
        return self.max_norms[0]

    def rows(self, index: np.ndarray) -> Tensor | Pair:
        """The rows at global ``index`` (in that order), as float32, scaled (a :class:`Pair` of paired shards)."""
        parts = tuple(self._rows(index, i) for i in range(len(self.names)))
        return Pair(*parts) if self.paired else parts[0]

    def _rows(self, index: np.ndarray, which: int) -> Tensor:
        shard, scale = np.searchsorted(self.offsets, index, side="right") - 1, self.scales[which]
        first, last = int(shard.min(initial=0)), int(shard.max(initial=0))
        if first == last:  # most batches of a window lie in one shard
            out = self._shard(first)[which].index_select(0, torch.from_numpy(index - self.offsets[first])).float()
        else:
            out = torch.empty(len(index), self._shard(first)[which].shape[1])
            for s in np.unique(shard):
                where = np.flatnonzero(shard == s)
                part = self._shard(int(s))[which].index_select(0, torch.from_numpy(index[where] - self.offsets[s]))
                out.index_copy_(0, torch.from_numpy(where), part.float())
        return out.mul_(scale) if scale != 1.0 else out

    def outliers(self, batch: Tensor | Pair) -> Tensor:
        """Which rows of a (scaled) batch are outlier tokens: either side's norm above its bound."""
        return any_outlier(batch if isinstance(batch, Pair) else (batch,), self.max_norms)

    def __iter__(self) -> Iterator[Tensor | Pair]:
        for batch in self._batches():
            filtered = self.drop_outliers and any(b is not None for b in self.max_norms)
            yield select(batch, ~self.outliers(batch)) if filtered else batch

    def _batches(self) -> Iterator[Tensor | Pair]:
        n = int(self.offsets[-1])
        if not self.shuffle:
            for start in range(0, n, self.batch_size):
                rows = np.arange(start, min(start + self.batch_size, n))
                mine = np.array_split(rows, self.world_size)[self.rank]
                yield self.rows(mine)
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = np.concatenate([start + rng.permutation(min(self.shuffle_buffer, n - start))
                                for start in range(0, n, self.shuffle_buffer)])
        per_rank = self.batch_size // self.world_size
        skip, self.skip = self.skip, 0
        for start in range(skip * self.batch_size, n - self.batch_size + 1, self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.rows(batch[self.rank * per_rank:(self.rank + 1) * per_rank])


@register_datamodule("activations")
class ActivationDataModule(LanguageModelData):
    """Activations of ``model`` at ``hook`` on a text dataset; see the module docstring. With ``hook_out`` (a later
    hook, e.g. ``mlp_out.L`` after ``hook: mlp_in.L``), a transcoder's data: :class:`Pair` batches of the
    activations at ``hook`` and at ``hook_out``, read in the same forward pass.

    ``model``: a Hub id, a local directory or ``package:NAME`` (``gguf_file`` for GGUF checkpoints).
    ``dataset``: a ``datasets`` name (``"text"``, ``"json"``, a Hub dataset) with ``dataset_config``,
    ``data_files`` (``package:NAME/glob`` allowed; with ``"text"`` each file is one document),
    ``split``, ``text_column`` and ``streaming``.
    Documents are tokenised without special tokens, joined with EOS, and cut into windows of
    ``context_len`` tokens (the first a BOS when ``prepend_bos``); ``drop_bos`` leaves BOS positions
    out of the data (their activations are outliers). ``normalize`` scales activations by one factor so
    that their mean norm is ``sqrt(d_model)`` (measured on the first training shard; kept in the
    manifest), and targets by their own factor to a mean norm ``sqrt(d_out)``. Every ``test_stride``-th
    context is held out (``n_test_tokens`` of them), the rest train.
    Outlier tokens, the "massive activations" some positions carry, whose norm exceeds ``outlier_factor``
    times the median norm (measured on the first training shard), are left out of training and of the
    held-out metrics, as BOS tokens are; :class:`sae_zoo.evaluation.TokenSums` counts them and
    reports the FVU with them too. A pair is an outlier when its input or its target is (each against
    its own median). ``outlier_factor=None`` keeps every token.
    ``batch_size`` is in tokens; ``model_batch_size`` contexts go through the LM at once.

    ``cache=False`` (the default) trains from the LM while it runs, through a mixing buffer of ``buffer_contexts``
    contexts (:class:`~sae_zoo.data.live.LiveActivations`); the scale, the outlier bounds and the mean target then
    come from the first ``stats_tokens`` training tokens, read once before training. ``cache=True`` writes every
    training activation to the cache first (measured on its first shard), for sweeps that train many models on the
    same tokens. Under DDP each rank runs the LM on its share of the contexts. ``prefetch`` reads the next refill
    through the LM in a thread while the current one trains (the same batches either way).
    """

    #: real activations have no true codes or dictionary to score against
    ground_truth = False

    def __init__(self, model: str, hook: str, *, hook_out: str | None = None, gguf_file: str | None = None,
                 revision: str | None = None,
                 model_dtype: str = "float32", dataset: str = "text", dataset_config: str | None = None,
                 data_files: str | list[str] | None = None, split: str = "train", text_column: str = "text",
                 streaming: bool = False, context_len: int = 128, prepend_bos: bool = True, drop_bos: bool = True,
                 n_train_tokens: int = 1_000_000, n_test_tokens: int = 16_384, test_stride: int = 16,
                 shard_tokens: int = 262_144,
                 cache_dir: str | None = None, cache_dtype: str = "float32", normalize: bool = True,
                 batch_size: int = 4096, model_batch_size: int = 32, shuffle_buffer: int = 262_144,
                 ce_contexts: int = 32, outlier_factor: float | None = 10.0, device: str = "auto",
                 seed: int = 0, cache: bool = False, buffer_contexts: int = 512, stats_tokens: int = 65_536,
                 prefetch: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"data.cache_dtype: {cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
        if context_len < 2 + prepend_bos:
            raise ValueError(f"data.context_len must be at least {2 + prepend_bos}, got {context_len}")
        if outlier_factor is not None and not outlier_factor > 1:
            raise ValueError(f"data.outlier_factor must be above 1 (a multiple of the median norm) or null, "
                             f"got {outlier_factor!r}")
        if min(n_train_tokens, n_test_tokens, batch_size, model_batch_size, test_stride, buffer_contexts,
               stats_tokens) < 1:
            raise ValueError("data.n_train_tokens, n_test_tokens, test_stride, batch_size, model_batch_size, "
                             "buffer_contexts and stats_tokens must be positive")
        self.identity = {"model": model, "gguf_file": gguf_file, "revision": revision, "model_dtype": model_dtype,
                         "hook": hook, "dataset": dataset, "dataset_config": dataset_config, "data_files": data_files,
                         "split": split, "text_column": text_column, "context_len": context_len,
                         "prepend_bos": prepend_bos, "drop_bos": drop_bos, "cache_dtype": cache_dtype,
                         "n_train_tokens": n_train_tokens, "n_test_tokens": n_test_tokens,
                         "test_stride": test_stride, "shard_tokens": shard_tokens, "cache_format": CACHE_FORMAT}
        if hook_out is not None:  # an SAE's cache keeps the identity (and the folder name) it had before pairs
            self.identity["hook_out"] = hook_out
        if not cache:  # on the fly the folder holds the held-out set and the statistics, whatever the token budget
            del self.identity["n_train_tokens"]
            self.identity.update(train="live", stats_tokens=stats_tokens)
        key = cache_key(self.identity)
        self.cache_dir = Path(cache_dir) if cache_dir else Path("runs") / "activation_cache" / key
        self.device = _auto_device() if device == "auto" else device
        self.tokens_per_context = context_len - (prepend_bos and drop_bos)
        if not cache and buffer_contexts * self.tokens_per_context < 2 * batch_size:
            raise ValueError(f"data.buffer_contexts: {buffer_contexts} contexts hold "
                             f"{buffer_contexts * self.tokens_per_context} tokens, fewer than two batches of "
                             f"{batch_size} (data.batch_size): the buffer serves until half is left, so it must hold "
                             f"at least {-(-2 * batch_size // self.tokens_per_context)} contexts")
        self._lm: tuple[torch.nn.Module, Any, HookPoint] | None = None
        self._target_hook: HookPoint | None = None
        self._manifest: dict[str, Any] | None = None
        self._median_norms: dict[str, float] = {}
        self._live: LiveActivations | None = None
        self._train: ShardedActivations | None = None
        self._resume_state: dict[str, Any] | None = None
        # no ground truth on real data: no true codes, no true dictionary
        self.n_latents, self.dictionary = None, None

    # ---- the language model, the text and the checks made before any long work ----

    @property
    def paired(self) -> bool:
        """Whether the data pair each input with a target (a transcoder's data): ``hook_out`` is set."""
        return self.hparams.hook_out is not None

    def language_model(self) -> tuple[torch.nn.Module, Any, HookPoint]:
        """``(lm, tokenizer, hook point)``, loaded once; checks the hooks and the context length."""
        if self._lm is None:
            h = self.hparams
            lm, tokenizer = load_language_model(h.model, gguf_file=h.gguf_file, revision=h.revision,
                                                dtype=h.model_dtype, device=self.device)
            hook = resolve_hook(lm, h.hook)
            if self.paired:
                self._target_hook = resolve_hook(lm, h.hook_out)
                if self._target_hook.same_place(hook):
                    raise ValueError(f"data.hook_out {h.hook_out!r} is the same place as data.hook {h.hook!r} (the "
                                     f"{hook.side} of {hook.path}): a transcoder reads one place and writes another; "
                                     "drop hook_out to train an SAE there")
            limit = max_context(lm)
            if limit is not None and h.context_len > limit:
                raise ValueError(f"data.context_len {h.context_len} is longer than {h.model} allows ({limit})")
            if h.prepend_bos and tokenizer.bos_token_id is None:
                raise ValueError(f"data.prepend_bos: the tokenizer of {h.model} has no BOS token; set prepend_bos=false")
            self._lm = (lm, tokenizer, hook)
        return self._lm

    @property
    def target_hook(self) -> HookPoint:
        """Where the targets are read and, to measure CE-loss recovered, written: ``hook_out``, else ``hook``."""
        _, _, hook = self.language_model()
        return self._target_hook or hook

    def rows(self) -> Iterator[dict[str, Any]]:
        """The dataset's rows, in order."""
        import datasets

        h = self.hparams
        files = h.data_files
        if files is not None:
            files = [resolve_package_path(f) for f in ([files] if isinstance(files, str) else files)]
            for pattern in files:
                if "://" not in pattern and not glob.glob(pattern):
                    raise ValueError(f"data.data_files: {pattern!r} matches no file")
        # the "text" builder reads a line per row unless told that each file is one document
        extra = {"sample_by": "document"} if h.dataset == "text" else {}
        yield from datasets.load_dataset(h.dataset, h.dataset_config, data_files=files, split=h.split,
                                         streaming=h.streaming, **extra)

    def documents(self) -> Iterator[str]:
        """The dataset's texts (its ``text_column``)."""
        return self.documents_of(self.rows())

    def contexts(self) -> Iterator[Tensor]:
        """Token windows ``(context_len,)`` in a fixed order: text tokenised in batches, or a pre-tokenised dataset's
        rows (an ``input_ids`` or ``tokens`` column) as they are (:mod:`sae_zoo.data.tokens`)."""
        _, tokenizer, _ = self.language_model()
        h = self.hparams
        rows = self.rows()
        first = next(rows, None)
        if first is None:
            return
        rows = itertools.chain([first], rows)
        column = token_column(first) if h.text_column not in first else None
        if column is not None:
            yield from token_rows(rows, column, h.context_len, h.prepend_bos, tokenizer.bos_token_id, repr(h.dataset))
            return
        bos = tokenizer.bos_token_id if h.prepend_bos else None
        yield from text_windows(self.documents_of(rows), tokenizer, h.context_len - h.prepend_bos, bos)

    def documents_of(self, rows: Iterator[dict[str, Any]]) -> Iterator[str]:
        column = self.hparams.text_column
        for row in rows:
            if column not in row:
                found = token_column(row)
                raise ValueError(f"data.text_column: the dataset {self.hparams.dataset!r} has no column {column!r}"
                                 + (f"; it is pre-tokenised (column {found!r}), and this reads text" if found else
                                    f" nor a pre-tokenised one ({', '.join(TOKEN_COLUMNS)})")
                                 + f"; its columns are {', '.join(row)}")
            yield row[column]

    def split_contexts(self, split: str) -> Iterator[Tensor]:
        """The held-out (``test``) or training contexts: every ``test_stride``-th context of the stream is
        held out until there are enough, so both splits come from the same stretch of text."""
        stride, n_test = self.hparams.test_stride, self._n_contexts(self.hparams.n_test_tokens)
        for i, context in enumerate(self.contexts()):
            if (i % stride == 0 and i // stride < n_test) == (split == "test"):
                yield context

    def _n_contexts(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.tokens_per_context)

    # ---- the cache ----

    def manifest(self) -> dict[str, Any] | None:
        path = self.cache_dir / MANIFEST
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        cached = manifest.get("identity", {})
        differing = {k: (cached.get(k), self.identity.get(k)) for k in {**self.identity, **cached}
                     if cached.get(k) != self.identity.get(k)}
        if differing:
            detail = "; ".join(f"{k}: cache has {a!r}, recipe asks {b!r}" for k, (a, b) in differing.items())
            raise ValueError(f"{path} describes other activations ({detail}); point data.cache_dir elsewhere "
                             "or delete that cache")
        return manifest

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.cache_dir / MANIFEST, manifest)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits the cache folder holds: on the fly, the held-out one alone."""
        return ("test", "train") if self.hparams.cache else ("test",)

    @property
    def complete(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and all(manifest["splits"][s]["complete"] for s in self.splits)
                    and (self.hparams.cache or "scale" in manifest))

    def prepare_data(self) -> None:
        """Collect whatever the cache lacks (resuming after the last shard written). Under DDP a cache's training
        shards are collected by every rank, each its share (:meth:`setup`); this process collects the rest."""
        shared = self._world_size() > 1 and self.hparams.cache
        if self.complete or (shared and self._held_out_complete):
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.cache_dir / ".lock"):
            if not self.complete:  # another process may have finished it while this one waited
                self._collect(("test",) if shared else self.splits)

    def setup(self, stage: str) -> None:
        """Under DDP (every rank, once the processes are joined): the training shards of a cache the ranks fill
        together, each running the LM on every ``world_size``-th shard."""
        if self.hparams.cache and self._world_size() > 1 and not self.complete:
            self._collect_shared(self.trainer.global_rank, self.trainer.world_size, self.trainer.strategy.barrier)

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    @property
    def _held_out_complete(self) -> bool:
        manifest = self.manifest()
        return bool(manifest and manifest["splits"]["test"]["complete"])

    def _new_manifest(self) -> dict[str, Any]:
        return {"identity": self.identity,
                "splits": {s: {"shards": [], "contexts_done": 0, "complete": False} for s in self.splits}}

    def _write_shard(self, manifest: dict[str, Any], split: str, index: int, tokens: Tensor) -> dict[str, Any]:
        """Read contexts ``tokens`` through the LM and write them as shard ``index`` of ``split``; its manifest entry
        (the widths go into ``manifest``)."""
        h = self.hparams
        acts, targets = self.read_pairs(tokens) if self.paired else (self.read_contexts(tokens), None)
        manifest.setdefault("d_model", int(acts.shape[-1]))
        name = f"{split}-{index:05d}.safetensors"
        rows = acts.reshape(-1, acts.shape[-1]).to(getattr(torch, h.cache_dtype))
        shard = {"file": name, "tokens": int(rows.shape[0])}
        more = {}
        if targets is not None:
            manifest.setdefault("d_out", int(targets.shape[-1]))
            more[TARGETS] = targets.reshape(-1, targets.shape[-1]).to(getattr(torch, h.cache_dtype))
        save_shard(self.cache_dir / name, ACTIVATIONS, rows, **more)
        if split == "test":  # the token ids too, for the CE-loss evaluation
            shard["token_ids"] = f"test-tokens-{index:05d}.safetensors"
            save_shard(self.cache_dir / shard["token_ids"], TOKEN_IDS, tokens.to(torch.int64))
        return shard

    def _first_shard_scales(self, manifest: dict[str, Any]) -> None:
        """The scales, from the first training shard (a cache's)."""
        first = self.cache_dir / manifest["splits"]["train"]["shards"][0]["file"]
        manifest["scale"] = _unit_scale(load_shard(first, ACTIVATIONS))
        if self.paired:
            manifest["target_scale"] = _unit_scale(load_shard(first, TARGETS))

    def _collect(self, splits: Sequence[str]) -> None:
        h = self.hparams
        manifest = self.manifest() or self._new_manifest()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        totals = {"test": self._n_contexts(h.n_test_tokens), "train": self._n_contexts(h.n_train_tokens)}
        totals = {split: totals[split] for split in splits}
        per_shard = max(1, h.shard_tokens // self.tokens_per_context)
        done = sum(manifest["splits"][split]["contexts_done"] for split in splits)
        progress = tqdm(total=sum(totals.values()) * self.tokens_per_context, initial=done * self.tokens_per_context,
                        desc=f"collecting {h.hook} activations", unit="tok", disable=None)
        start, resumed_at = time.perf_counter(), done
        for split, total in totals.items():
            state = manifest["splits"][split]
            stream = self.split_contexts(split)
            for _ in range(state["contexts_done"]):  # skip what the cache holds
                next(stream)
            while state["contexts_done"] < total:
                count = min(per_shard, total - state["contexts_done"])
                windows = [next(stream, None) for _ in range(count)]
                if windows[-1] is None:
                    raise ValueError(f"data: the dataset ran out after {state['contexts_done']} {split} contexts of "
                                     f"{h.context_len} tokens; lower n_train_tokens/n_test_tokens/test_stride or add text")
                state["shards"].append(self._write_shard(manifest, split, len(state["shards"]), torch.stack(windows)))
                state["contexts_done"] += count
                done += count
                state["complete"] = state["contexts_done"] >= total
                if split == "train" and "scale" not in manifest:
                    self._first_shard_scales(manifest)
                self._save_manifest(manifest)
                progress.update(count * self.tokens_per_context)
        progress.close()
        tokens = (done - resumed_at) * self.tokens_per_context
        if not h.cache and "scale" not in manifest:  # on the fly: the statistics of a first sample of training tokens
            tokens += self._collect_statistics(manifest)
        seconds = time.perf_counter() - start
        log.info("collected %s tokens of %s activations in %.0f s (%s tokens/s on %s) into %s", f"{tokens:,}", h.hook,
                 seconds, f"{tokens / max(seconds, 1e-9):,.0f}", self.device, self.cache_dir)

    def _collect_shared(self, rank: int, world_size: int, barrier: Callable[[str], None]) -> None:
        """The training shards, rank ``rank`` of ``world_size`` running the LM on shards ``rank``, ``rank +
        world_size``, ... (every rank reads the token stream; a shard already written is kept, so an interrupted
        collection resumes); then rank zero lists them all in the manifest."""
        h = self.hparams
        total, per_shard = self._n_contexts(h.n_train_tokens), max(1, h.shard_tokens // self.tokens_per_context)
        n_shards = -(-total // per_shard)
        manifest = self.manifest() or self._new_manifest()
        stream = self.split_contexts("train")
        for index in range(n_shards):
            count = min(per_shard, total - index * per_shard)
            if index % world_size != rank or (self.cache_dir / f"train-{index:05d}.safetensors").exists():
                for _ in range(count):  # another rank's shard, or one written before: its token ids only
                    next(stream, None)
                continue
            windows = [next(stream, None) for _ in range(count)]
            if windows[-1] is None:
                raise ValueError(f"data: the dataset ran out before training shard {index}; lower n_train_tokens or "
                                 "add text")
            self._write_shard(manifest, "train", index, torch.stack(windows))
        barrier("cache shards written")
        if rank == 0:
            manifest = self.manifest()
            files = [self.cache_dir / f"train-{i:05d}.safetensors" for i in range(n_shards)]
            manifest["splits"]["train"] = {"shards": [{"file": f.name, "tokens": shard_rows(f)} for f in files],
                                           "contexts_done": total, "complete": True}
            self._first_shard_scales(manifest)
            self._save_manifest(manifest)
        barrier("cache manifest written")
        self._manifest = None

    def _collect_statistics(self, manifest: dict[str, Any]) -> int:
        """The scales, median norms and mean target of the first ``stats_tokens`` training tokens (all of them, when
        there are fewer), kept in the manifest and ``stats.safetensors`` (a cache measures them on its first
        training shard). Returns how many tokens it read."""
        h = self.hparams
        n = self._n_contexts(min(h.stats_tokens, h.n_train_tokens))
        contexts = list(itertools.islice(self.split_contexts("train"), n))
        if len(contexts) < n:
            raise ValueError(f"data.stats_tokens: the dataset holds {len(contexts)} training contexts, fewer than the "
                             f"{n} the statistics read; lower stats_tokens or add text")
        tokens = torch.stack(contexts)
        sides = self.read_pairs(tokens) if self.paired else (self.read_contexts(tokens),)
        sides = [side.reshape(-1, side.shape[-1]) for side in sides]
        names = (ACTIVATIONS, TARGETS)[:len(sides)]
        manifest["median_norms"] = {name: float(side.norm(dim=-1).median()) for name, side in zip(names, sides)}
        manifest["scale"] = _unit_scale(sides[0])
        if self.paired:
            manifest["target_scale"] = _unit_scale(sides[1])
        self._manifest, self._median_norms = manifest, dict(manifest["median_norms"])
        mean = self._mean_target(sides)
        save_shard(self.cache_dir / STATS, "target_mean", mean)
        self._save_manifest(manifest)
        return len(sides[0])

    @torch.no_grad()
    def read_contexts(self, tokens: Tensor) -> Tensor:
        """Activations (float32, on the CPU, unscaled) at the hook of token windows ``(n, context_len)``, read
        ``model_batch_size`` at a time; BOS positions left out when the data leave them out."""
        lm, _, hook = self.language_model()
        acts = torch.cat([read_activations(lm, hook, chunk).float().cpu()
                          for chunk in tokens.split(self.hparams.model_batch_size)])
        return acts[:, 1:] if self.hparams.prepend_bos and self.hparams.drop_bos else acts

    @torch.no_grad()
    def read_pairs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of paired data, as :meth:`read_contexts` reads inputs, from the same forward passes."""
        lm, _, hook = self.language_model()
        pairs = [read_pair(lm, hook, self.target_hook, chunk) for chunk in tokens.split(self.hparams.model_batch_size)]
        first = 1 if self.hparams.prepend_bos and self.hparams.drop_bos else 0
        return tuple(torch.cat([pair[i].float().cpu() for pair in pairs])[:, first:] for i in (0, 1))

    # ---- serving ----

    def _checked_manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if not self.complete:
                self.prepare_data()
            self._manifest = self.manifest()
        return self._manifest

    @property
    def d_model(self) -> int:
        """The activation width: from the cache, or else by loading the model and reading one context,
        which checks the hooks, the context length and the dataset before any long work."""
        return self._widths()[0]

    @property
    def d_out(self) -> int:
        """The targets' width: ``hook_out``'s activations for paired data, else ``d_model``."""
        return self._widths()[1]

    def _widths(self) -> tuple[int, int]:
        manifest = self.manifest()
        if manifest and "d_model" in manifest:
            return int(manifest["d_model"]), int(manifest.get("d_out", manifest["d_model"]))
        lm, _, hook = self.language_model()
        probe = next(self.contexts(), None)
        if probe is None:
            raise ValueError(f"data: the dataset holds less than one context of {self.hparams.context_len} tokens")
        if not self.paired:
            width = int(read_activations(lm, hook, probe[None]).shape[-1])
            return width, width
        inputs, targets = read_pair(lm, hook, self.target_hook, probe[None])
        return int(inputs.shape[-1]), int(targets.shape[-1])

    def describe(self) -> dict[str, Any]:
        """Where the activations came from, for the decoder's provenance and the model card."""
        h = self.hparams
        out = {"data": "activations", "model_name": h.model, "hook_name": h.hook, "dataset": h.dataset,
               "context_len": h.context_len, "input_scale": self.scale, "outlier_factor": h.outlier_factor}
        if self.paired:
            out.update(hook_name_out=h.hook_out, target_scale=self.target_scale)
        return out

    @property
    def scale(self) -> float:
        return float(self._checked_manifest()["scale"]) if self.hparams.normalize else 1.0

    @property
    def target_scale(self) -> float:
        """The targets' scale factor (the inputs' of unpaired data, whose targets are their inputs)."""
        if not self.paired:
            return self.scale
        return float(self._checked_manifest()["target_scale"]) if self.hparams.normalize else 1.0

    def _first_train_rows(self, name: str) -> Tensor:
        first = self._checked_manifest()["splits"]["train"]["shards"][0]["file"]
        return load_shard(self.cache_dir / first, name).float()

    def _outlier_bound(self, name: str, scale: float) -> float | None:
        if self.hparams.outlier_factor is None:
            return None
        if name not in self._median_norms:
            saved = self._checked_manifest().get("median_norms", {})
            self._median_norms[name] = saved[name] if name in saved else float(
                self._first_train_rows(name).norm(dim=-1).median())
        return self.hparams.outlier_factor * self._median_norms[name] * scale

    @property
    def outlier_norm(self) -> float | None:
        """The (scaled) norm above which a token is an outlier: ``outlier_factor`` x the median norm of the
        first training shard's tokens. None when ``outlier_factor`` is None."""
        return self._outlier_bound(ACTIVATIONS, self.scale)

    @property
    def target_outlier_norm(self) -> float | None:
        """The same bound for the targets (the inputs' of unpaired data)."""
        return self._outlier_bound(TARGETS, self.target_scale) if self.paired else self.outlier_norm

    @property
    def target_mean(self) -> Tensor:
        """The mean target (unscaled, ``(d_out,)``) of the first training shard's tokens (on the fly: of the first
        ``stats_tokens``), outliers left out: what mean ablation writes in place of the targets (the activations of
        unpaired data)."""
        if not self.hparams.cache:
            self._checked_manifest()
            return load_shard(self.cache_dir / STATS, "target_mean")
        return self._mean_target([self._first_train_rows(name)
                                  for name in ((ACTIVATIONS, TARGETS) if self.paired else (ACTIVATIONS,))])

    def _mean_target(self, sides: Sequence[Tensor]) -> Tensor:
        """The mean of the last of ``sides`` (unscaled rows: the inputs, and a pair's targets) over its clean rows."""
        scaled = [side * scale for side, scale in zip(sides, (self.scale, self.target_scale))]
        keep = ~any_outlier(scaled, (self.outlier_norm, self.target_outlier_norm))
        return sides[-1][keep].mean(0)

    def _dataset(self, split: str, shuffle: bool, rank: int | None = None,
                 world_size: int | None = None, drop_outliers: bool = True) -> ShardedActivations:
        manifest = self._checked_manifest()
        files = [self.cache_dir / s["file"] for s in manifest["splits"][split]["shards"]]
        if rank is None or world_size is None:  # the trainer's slice of every batch
            trainer = getattr(self, "trainer", None)
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        paired = {"target_scale": self.target_scale, "target_max_norm": self.target_outlier_norm} if self.paired else {}
        return ShardedActivations(files, self.hparams.batch_size, scale=self.scale,
                                  shuffle=shuffle, shuffle_buffer=self.hparams.shuffle_buffer, seed=self.hparams.seed,
                                  rank=rank, world_size=world_size, max_norm=self.outlier_norm,
                                  drop_outliers=drop_outliers, **paired)

    def _loader(self, dataset: ShardedActivations) -> DataLoader:
        return DataLoader(dataset, batch_size=None, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if not self.hparams.cache:
            return DataLoader(self.live(), batch_size=None)
        self._train = self._dataset("train", shuffle=True)
        if self._resume_state is not None:
            self._train.epoch, self._train.skip = self._resume_state["epoch"], self._resume_state["served"]
            self._resume_state = None
        return self._loader(self._train)

    def live(self, rank: int | None = None, world_size: int | None = None, read: Reader | None = None,
             pack: Callable[[tuple[Tensor, ...]], Any] | None = None,
             resume: dict[str, Any] | None = None) -> LiveActivations:
        """The training batches read from the LM while it runs (:class:`~sae_zoo.data.live.LiveActivations`): the
        trainer's slice of every global batch, unless ``rank`` and ``world_size`` are given. ``read`` and ``pack``
        replace :meth:`live_rows` and the batches' form (several hooks' data read them in one pass); ``resume`` is a
        saved data position to start from."""
        h = self.hparams
        if rank is None or world_size is None:
            trainer = getattr(self, "trainer", None)
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        refill = -(-h.buffer_contexts // 2 // world_size) * world_size  # half the buffer, whole blocks per rank
        self._live = LiveActivations(
            lambda skip: itertools.islice(self.split_contexts("train"), skip, None), read or self.live_rows,
            n_contexts=self._n_contexts(h.n_train_tokens), batch_size=h.batch_size,
            capacity=h.buffer_contexts * self.tokens_per_context, refill=refill, paired=self.paired, seed=h.seed,
            rank=rank, world_size=world_size, pack=pack, prefetch=h.prefetch)
        resume = resume if resume is not None else self._resume_state
        if resume is not None:
            self._live.load_state_dict(resume)
            self._resume_state = None
        return self._live

    def sample_batches(self) -> Iterable[Tensor | Pair]:
        """Training batches for a sample of training rows (a run's start reads some), without moving the trainer's
        loader on: on the fly, :meth:`LiveActivations.sample`; from a cache, a first pass of a dataset of their own
        (the trainer's keeps its pass and position, which a resumed run restores)."""
        if not self.hparams.cache:
            return (self.live() if self._live is None else self._live).sample()
        return self._loader(self._dataset("train", shuffle=True))

    def live_rows(self, tokens: Tensor) -> tuple[Tensor, ...]:
        """The training rows of contexts ``tokens``, as the buffer holds them: scaled, outlier tokens left out."""
        sides = self.read_pairs(tokens) if self.paired else (self.read_contexts(tokens),)
        sides = [side.reshape(-1, side.shape[-1]) * scale for side, scale in zip(sides, (self.scale, self.target_scale))]
        keep = ~any_outlier(sides, (self.outlier_norm, self.target_outlier_norm))
        return tuple(side[keep] for side in sides)

    # ---- the data position, for runs that resume ----

    def state_dict(self) -> dict[str, Any]:
        """The data position after the batches the trainer has trained on in this pass over the data (Lightning
        writes it into every checkpoint): on the fly, the stream's (contexts read, the buffer, the shuffle's RNG);
        from a cache, the pass's shuffle and how many of its batches were served."""
        trainer = getattr(self, "trainer", None)
        served = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        if self._live is not None:
            return {"live": self._live.state_dict(served)}
        if self._train is not None:
            return {"cache": {"epoch": self._train.epoch - 1, "served": served}}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_state = state.get("live", state.get("cache"))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", shuffle=False))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", shuffle=False))

    def _held_out(self, drop_outliers: bool = True) -> ShardedActivations:
        """The whole held-out split, in order, for this process alone (not the trainer's slice)."""
        return self._dataset("test", shuffle=False, rank=0, world_size=1, drop_outliers=drop_outliers)

    def held_out_rows(self) -> ShardedActivations:
        """Every held-out token, outliers included, in order: row ``i`` is position ``i % tokens_per_context``
        of context ``i // tokens_per_context`` (its ``outliers(batch)`` says which are outliers)."""
        return self._held_out(drop_outliers=False)

    @property
    def held_out_tokens(self) -> int:
        return sum(s["tokens"] for s in self._checked_manifest()["splits"]["test"]["shards"])

    @property
    def window_identity(self) -> dict[str, Any]:
        return {k: self.hparams[k] for k in ("model", "gguf_file", "revision", "model_dtype", "hook", "prepend_bos",
                                             "drop_bos", "cache_dtype")}

    @property
    def context_len(self) -> int:
        return self.hparams.context_len

    @property
    def prepend_bos(self) -> bool:
        return self.hparams.prepend_bos

    @property
    def model_batch_size(self) -> int:
        return self.hparams.model_batch_size

    def held_out_batches(self) -> Iterator[Tensor]:
        """Every held-out batch (scaled), in order, on this process alone."""
        return iter(self._held_out())

    @property
    def test_x(self) -> Tensor:
        """All held-out inputs (scaled), in order, outlier tokens left out."""
        ds = self._held_out()
        rows = ds.rows(np.arange(int(ds.offsets[-1])))
        rows = select(rows, ~ds.outliers(rows))
        return rows.x if isinstance(rows, Pair) else rows

    def ce_batches(self) -> tuple[Tensor, float, bool]:
        """``(token ids (n, context_len), input scale, whether position 0 was left out of the data)`` of
        the ``ce_contexts`` held-out contexts on which the LM's loss is measured (:mod:`sae_zoo.evaluation`)."""
        shards = self._checked_manifest()["splits"]["test"]["shards"]
        tokens = torch.cat([load_shard(self.cache_dir / s["token_ids"], TOKEN_IDS) for s in shards])
        return tokens[: self.hparams.ce_contexts], self.scale, self.hparams.prepend_bos and self.hparams.drop_bos


def _auto_device() -> str:
    """This process's GPU where there is one (a DDP rank's own, by ``LOCAL_RANK``), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _unit_scale(rows: Tensor) -> float:
    """The factor that brings the rows' mean norm to ``sqrt(width)`` (1 for all-zero rows)."""
    norm = rows.float().norm(dim=-1).mean().item()
    return math.sqrt(rows.shape[1]) / norm if norm > 0 else 1.0
