"""The paper's synthetic sparse-coding data: k-sparse half-normal codes mixed by a random unit-norm dictionary."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._signature import check_types
from .base import Batch, SparseCodingData
from .registry import register_datamodule

PAPER_SEED = 20240625


def generate_sparse_data(n_samples: int, n_latents: int, d_model: int, k: int, seed: int = PAPER_SEED
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``(codes, x, dictionary)`` exactly as the paper's generator does.

    Per sample: ``|N(0, 1)|`` in all ``n_latents`` coordinates, then ``k`` of them kept, chosen
    uniformly without replacement (NumPy's legacy generator seeded with ``seed``). The dictionary
    is ``randn(n_latents, d_model)`` from a torch generator seeded with ``seed``, rows normalised
    to unit norm; ``x = codes @ dictionary``, no noise. With the same seed this reproduces the
    authors' data bit for bit.
    """
    if not 1 <= k <= n_latents:
        raise ValueError(f"need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
    rng = np.random.RandomState(seed)
    codes = np.zeros((n_samples, n_latents))
    for i in range(n_samples):
        magnitudes = np.abs(rng.normal(0, 1, n_latents))
        support = rng.choice(n_latents, k, replace=False)
        codes[i, support] = magnitudes[support]
    dictionary = torch.randn(n_latents, d_model, generator=torch.Generator().manual_seed(seed))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    codes_t = torch.tensor(codes, dtype=torch.float32)
    return codes_t, codes_t @ dictionary, dictionary


class RepeatedBatch(Dataset):
    """One full batch served ``length`` times: full-batch training with many steps per epoch."""

    def __init__(self, tensors: tuple[Tensor, ...], length: int) -> None:
        self.tensors, self.length = tensors, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.tensors


@register_datamodule("synthetic")
class SyntheticSparseDataModule(SparseCodingData):
    """The paper's synthetic data: one draw of ``n_train + n_test`` samples, split in that order.

    Batches are ``(x, true_codes)``. ``batch_size=None`` trains full-batch, as the paper does,
    with ``steps_per_epoch`` optimiser steps per epoch (one evaluation each). The data depend only
    on ``seed``, never on the global RNG, so model seeds can vary on one fixed dataset.
    """

    #: the generator's codes and dictionary are known, so recovery can be scored
    ground_truth = True

    def __init__(self, n_latents: int = 16, d_model: int = 8, k: int = 3, n_train: int = 1024, n_test: int = 1024,
                 seed: int = PAPER_SEED, batch_size: int | None = None, steps_per_epoch: int = 1000) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_types(type(self).__init__, dict(self.hparams), what="the synthetic data", key_prefix="data.")
        for name in ("n_latents", "d_model", "k", "n_train", "n_test", "steps_per_epoch", "batch_size"):
            if self.hparams[name] is not None and self.hparams[name] < 1:
                raise ValueError(f"data.{name} must be at least 1, got {self.hparams[name]!r}")
        self.n_latents, self._d_model, self.k = n_latents, d_model, k
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        codes, x, self.dictionary = generate_sparse_data(n_train + n_test, n_latents, d_model, k, seed)
        self.train_codes, self._test_codes = codes[:n_train], codes[n_train:]
        self.train_x, self._test_x = x[:n_train], x[n_train:]

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def test_x(self) -> Tensor:
        return self._test_x

    @property
    def test_codes(self) -> Tensor:
        return self._test_codes

    @property
    def true_l0(self) -> float:
        return float(self.k)

    def train_dataloader(self) -> DataLoader:
        if self.batch_size is None:
            return DataLoader(RepeatedBatch((self.train_x, self.train_codes), self.steps_per_epoch), batch_size=None)
        return DataLoader(TensorDataset(self.train_x, self.train_codes), batch_size=self.batch_size, shuffle=True)

    def _held_out(self) -> DataLoader:
        if self.batch_size is None:
            return DataLoader(RepeatedBatch((self.test_x, self.test_codes), 1), batch_size=None)
        return DataLoader(TensorDataset(self.test_x, self.test_codes), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """The test split, for monitoring during training (as the paper logs it); nothing is selected on it."""
        return self._held_out()

    def test_dataloader(self) -> DataLoader:
        return self._held_out()

    def describe(self) -> dict[str, Any]:
        """Where the data came from, for the decoder's provenance and the model card."""
        return {"data": "synthetic", "data_seed": self.hparams.seed}

    def held_out_batches(self) -> Iterator[Batch]:
        return iter(self._held_out())
