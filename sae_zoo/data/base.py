"""The contract every recipe datamodule satisfies: what the recipe, the evaluation and the model card
read from the data, declared once."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
from torch import Tensor

#: a batch: inputs ``x``, ``(x, true_codes)`` where the data know their codes, or a transcoder's :class:`Pair`
Batch = Tensor | tuple[Tensor, ...] | list[Tensor]


class Pair(NamedTuple):
    """A transcoder's batch: ``x``, the activations it reads (e.g. an MLP's input), and ``target``, those it
    writes (that MLP's output), row for row. An SAE's batch is its input alone: its target is the input."""

    x: Tensor
    target: Tensor


def unpack_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """``x`` or ``(x, true_codes)`` -> ``(x, true_codes or None)``; a transcoder's :class:`Pair` -> ``(x, None)``."""
    if isinstance(batch, Pair):
        return batch.x, None
    if isinstance(batch, Tensor):
        return batch, None
    if len(batch) == 1:
        return batch[0], None
    return batch[0], batch[1]


def split_batch(batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, target, true_codes or None)``: an SAE's target is its input; a transcoder's :class:`Pair` carries it."""
    if isinstance(batch, Pair):
        return batch.x, batch.target, None
    x, true_codes = unpack_batch(batch)
    return x, x, true_codes


def move(batch: Batch, device: torch.device | str) -> Batch:
    """A batch (a tensor, a tuple or list of tensors, a :class:`Pair`) on ``device``, its kind kept."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    moved = [t.to(device) for t in batch]
    return Pair(*moved) if isinstance(batch, Pair) else type(batch)(moved)


class SparseCodingData(L.LightningDataModule, metaclass=ABCMeta):
    """A LightningDataModule of inputs to encode, with what is known about them.

    * ``ground_truth``: whether the data carry true codes and a true dictionary, so that recovery
      (MCC, dictionary MCC) can be scored; then ``n_latents`` is the true latent count and
      ``dictionary`` the true atoms ``(n_latents, d_model)``, else both are None.
    * ``d_model``: the input width (it may load a model or read a cache to find it).
    * ``paired``: whether batches are :class:`Pair` batches, a transcoder's inputs with their targets; then ``d_out``
      is the targets' width (an SAE's targets are its inputs: ``d_out`` is ``d_model``).
    * ``describe()``: where the data came from, for the decoder's provenance and the model card.
    * ``held_out_batches()``: every held-out batch, in order, on the calling process alone (the
      evaluation of a trained model reads them; a multi-device test loader splits them).
    * ``test_x``: all held-out inputs as one tensor; ``test_codes`` their true codes (or None).
    * ``true_l0``: the mean number of true latents active per sample, where the data know it.
    * ``check_arguments(kwargs)``: the checks a recipe runs on the data's arguments before anything is
      built (a classmethod; none by default).
    """

    ground_truth: ClassVar[bool]
    n_latents: int | None
    dictionary: Tensor | None

    @property
    @abstractmethod
    def d_model(self) -> int:
        """The width of the inputs."""

    @property
    def paired(self) -> bool:
        return False

    @property
    def d_out(self) -> int:
        """The width of the targets."""
        return self.d_model

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Where the data came from: ``{"data": name, ...}``."""

    @abstractmethod
    def held_out_batches(self) -> Iterator[Batch]:
        """Every held-out batch, in order, on this process alone."""

    def sample_batches(self) -> Iterable[Batch]:
        """Training batches for a sample of training rows, which a run's start and end read (a decoder-bias start,
        a target L0), from a loader of their own: the first batches of a first pass, as the trainer's loader will
        serve them. Reading them must not move the trainer's loader on (its pass, its stream); a fresh
        ``train_dataloader()`` is one, where each call builds its own dataset."""
        return self.train_dataloader()

    @property
    @abstractmethod
    def test_x(self) -> Tensor:
        """All held-out inputs, ``(n, d_model)``."""

    @property
    def test_codes(self) -> Tensor | None:
        """The held-out inputs' true codes, where the data know them."""
        return None

    @property
    def true_l0(self) -> float | None:
        """The mean number of true latents active per sample, where the data know it."""
        return None

    @classmethod
    def check_arguments(cls, kwargs: dict[str, Any]) -> None:
        """Checks of the data's arguments that need no data (raise ``ValueError`` naming the ``data.`` key)."""


class LanguageModelData(SparseCodingData):
    """A language model's activations at a hook (and, for a transcoder, at a later hook), cached or read live: what
    evaluation reads of any such source (held-out FVU with per-context sums, the CE splice, mean ablation, probing,
    dashboards and upgrades), declared once. Batches and held-out rows are scaled (:attr:`scale`, and a pair's
    targets by :attr:`target_scale`); positions the data leave out (BOS where dropped, outlier tokens above
    :attr:`outlier_norm`) are left out of batches.

    * ``language_model()``: ``(lm, tokenizer, hook point)``; :attr:`target_hook` where the targets are read.
    * ``held_out_rows()``: every held-out token in order, outliers included (row ``i`` is position
      ``i % tokens_per_context`` of context ``i // tokens_per_context``), with ``outliers(batch)`` saying which
      are outliers; :attr:`held_out_tokens` counts them.
    * ``ce_batches()``: the held-out token ids the LM's loss is measured on.
    * ``read_contexts(tokens)``: unscaled activations at the hook of token windows (probing and dashboards).
    * :attr:`window_identity`: what fixes the activations of a window (LM, hook, BOS handling), for caches of
      windows; :attr:`cache_dir`: the folder they are cached in.
    """

    cache_dir: Any
    device: str
    tokens_per_context: int

    @abstractmethod
    def language_model(self) -> tuple[torch.nn.Module, Any, Any]:
        """``(lm, tokenizer, hook point)``."""

    @property
    @abstractmethod
    def target_hook(self) -> Any:
        """Where the targets are read (and written to measure CE-loss recovered)."""

    @property
    @abstractmethod
    def scale(self) -> float:
        """The inputs' scale factor."""

    @property
    @abstractmethod
    def target_scale(self) -> float:
        """The targets' scale factor (the inputs' for unpaired data)."""

    @property
    @abstractmethod
    def outlier_norm(self) -> float | None:
        """The scaled norm above which an input is an outlier token (None: no outliers)."""

    @property
    @abstractmethod
    def target_outlier_norm(self) -> float | None:
        """The same bound for the targets."""

    @property
    @abstractmethod
    def target_mean(self) -> Tensor:
        """The mean target over training tokens (unscaled): what mean ablation writes."""

    @abstractmethod
    def held_out_rows(self) -> Any:
        """Every held-out token in order, outliers included; ``outliers(batch)`` names them."""

    @property
    @abstractmethod
    def held_out_tokens(self) -> int:
        """How many held-out tokens there are, outliers included."""

    @abstractmethod
    def ce_batches(self) -> tuple[Tensor, float, bool]:
        """``(token ids (n, context_len), input scale, whether position 0 is left out of the data)``."""

    @abstractmethod
    def read_contexts(self, tokens: Tensor) -> Tensor:
        """Unscaled activations ``(n, tokens kept, d_model)`` at the hook of token windows ``(n, context_len)``."""

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """The dataset's texts."""

    @property
    @abstractmethod
    def window_identity(self) -> dict[str, Any]:
        """What fixes a window's activations (model, hook, BOS handling, dtype), JSON-able."""

    @property
    @abstractmethod
    def context_len(self) -> int:
        """Tokens per context, BOS included."""

    @property
    @abstractmethod
    def prepend_bos(self) -> bool:
        """Whether each context starts with BOS."""

    @property
    @abstractmethod
    def model_batch_size(self) -> int:
        """Contexts per LM forward pass."""
