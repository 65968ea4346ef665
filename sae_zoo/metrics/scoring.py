"""What a model is scored against: the truth its data know. An evaluation piece, kept apart from the model, which
only computes; a recipe builds it from its data (:meth:`Scoring.from_data`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .collection import SparseCodingMetrics


@dataclass
class Scoring:
    """``code_recovery``: whether held-out batches that carry true codes are scored on them (MCC and the latents as
    feature detectors; its ``n_latents x n_true`` state may be dropped where it costs too much); ``true_dictionary``
    (``(n_true, d_model)``): the atoms a learned or pretrained dictionary is scored against (dictionary MCC,
    uniqueness, shrinkage), or None."""

    code_recovery: bool = True
    true_dictionary: Tensor | None = None

    def __post_init__(self) -> None:
        if self.true_dictionary is not None and self.true_dictionary.dim() != 2:
            raise ValueError(f"true_dictionary must have shape (n_true, d_model), got "
                             f"{tuple(self.true_dictionary.shape)}")

    @classmethod
    def from_data(cls, datamodule: Any, learned: bool = True, code_recovery: bool | None = None) -> Scoring:
        """What ``datamodule`` knows of the truth: its true dictionary scores a ``learned`` (or pretrained) one, and
        codes are scored where the data know them, unless ``code_recovery`` is False."""
        truth = bool(datamodule.ground_truth)
        return cls(code_recovery=truth and (code_recovery is None or bool(code_recovery)),
                   true_dictionary=datamodule.dictionary if learned and truth else None)

    def check(self, d_model: int) -> None:
        """Refuse a true dictionary of another width than the model's atoms (``d_model``)."""
        if self.true_dictionary is not None and self.true_dictionary.shape[1] != d_model:
            raise ValueError(f"true_dictionary must have shape (n, {d_model}), got {tuple(self.true_dictionary.shape)}")

    def new_metrics(self, d_model: int, n_latents: int, device: torch.device | str = "cpu",
                    sync_on_compute: bool = True) -> SparseCodingMetrics:
        """Fresh metrics for a model of ``n_latents`` atoms of width ``d_model``; ``sync_on_compute=False``: computed
        by one process on what it saw, without the other ranks."""
        # an over- or under-complete dictionary is scored against the true latents it should recover
        n_true = None if self.true_dictionary is None else self.true_dictionary.shape[0]
        return SparseCodingMetrics(d_model, n_latents, num_true_latents=n_true, code_recovery=self.code_recovery,
                                   dictionary_recovery=self.true_dictionary is not None,
                                   sync_on_compute=sync_on_compute).to(device)

    def update(self, metrics: SparseCodingMetrics, x_hat: Tensor, target: Tensor, codes: Tensor,
               true_codes: Tensor | None, atoms: Tensor) -> None:
        """Add one held-out batch: the model's output ``x_hat`` and ``codes`` for ``target``; ``atoms``: its
        dictionary's directions."""
        metrics.update(x_hat, target, codes, true_codes, atoms=atoms, true_atoms=self._true_atoms(atoms))

    def update_dictionary(self, metrics: SparseCodingMetrics, atoms: Tensor) -> bool:
        """Score the dictionary's directions ``atoms`` against the true ones; False where there are none."""
        if self.true_dictionary is None:
            return False
        metrics.update_dictionary(atoms, self._true_atoms(atoms))
        return True

    def _true_atoms(self, atoms: Tensor) -> Tensor | None:
        """The true atoms, moved once to the device the model's are on."""
        if self.true_dictionary is not None and self.true_dictionary.device != atoms.device:
            self.true_dictionary = self.true_dictionary.to(atoms.device)
        return self.true_dictionary
