"""The paper's sparse coding: free per-sample codes learned jointly with the dictionary."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import require_at_least
from .ito import ITOEncoder
from .registry import register_encoder


@register_encoder("sparse_coding")
class SparseCodingEncoder(ITOEncoder):
    """The paper's sparse coding: free per-sample codes learned with the dictionary, ITO for new inputs.

    Free codes ``exp(log_s)`` for each of the ``n_train`` training samples, trained by the model's
    optimiser together with the dictionary (the paper's sparse coding, for unknown codes and
    dictionary); new inputs are encoded by ITO against the learned dictionary.

    Training must be full-batch: every training batch is the whole training set, in the same order
    (``SyntheticSparseDataModule(batch_size=None)``), since row ``i`` of the batch owns code ``i``.
    The ITO arguments (``steps``, ``lr``, ``batch_mean``, ...) set the inference; the paper infers
    test codes with 10k Adam steps at lr 3e-3.
    """

    example_kwargs = {"steps": 30, "n_train": 8}

    def __init__(self, d_model: int, n_latents: int, n_train: int = 1024, steps: int = 10_000, lr: float = 3e-3,
                 init_log: float = -10.0, batch_mean: bool = True, l1_coeff: float = 0.01) -> None:
        super().__init__(d_model, n_latents, steps=steps, lr=lr, init_log=init_log, batch_mean=batch_mean,
                         l1_coeff=l1_coeff)
        require_at_least("sparse_coding", 1, n_train=n_train)
        self.n_train = int(n_train)
        self.log_codes = nn.Parameter(torch.full((self.n_train, n_latents), float(init_log)))

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        if not self.training:
            return super().forward(x, dictionary)
        x = self.check_input(x, dictionary)
        if x.shape[:-1] != (self.n_train,):
            raise ValueError(f"sparse_coding trains one free code per training sample: it needs full batches of "
                             f"n_train={self.n_train} samples, got inputs of shape {tuple(x.shape)}")
        return self.log_codes.exp()

    def trained_part(self) -> "SparseCodingEncoder":
        return self

    def training_encode_flops(self) -> tuple[float, float]:
        return 0, self.n_latents  # the codes are parameters; one exp per code
