"""The contract every recipe datamodule satisfies: what the recipe, the evaluation and the model card
read from the data, declared once."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
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
