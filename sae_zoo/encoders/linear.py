"""The sparse autoencoder's encoder: one linear map and a ReLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead
from .registry import register_encoder


@register_encoder("linear")
class LinearEncoder(EncoderHead):
    """``codes = ReLU(W x + b)``: the standard SAE encoder (the paper's "L-NL" encoder).

    With ``subtract_decoder_bias=True`` it encodes ``x - b_dec`` (the dictionary's bias), as
    SAELens, sparsify and dictionary_learning do.
    """

    nonnegative_codes = True

    def __init__(self, d_model: int, n_latents: int, bias: bool = True, subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents, bias=bias)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        self.check_input(x)
        return F.relu(self.linear(self.centre(x, dictionary)))

    def encode_flops(self) -> tuple[float, float]:
        return 2 * self.d_model * self.n_latents, self.n_latents + self.subtract_decoder_bias * self.d_model
