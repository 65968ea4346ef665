"""Top-k SAE encoder: keep the k largest pre-activations of a linear map."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead
from .registry import register_encoder


@register_encoder("topk")
class TopKEncoder(EncoderHead):
    """``codes = ReLU(TopK_k(W x + b))``: every other latent is set to zero.

    ``subtract_decoder_bias=True`` encodes ``x - b_dec``, as SAELens, sparsify and dictionary_learning do.
    """

    def __init__(self, d_model: int, n_latents: int, k: int, bias: bool = True,
                 subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        if not 1 <= k <= n_latents:
            raise ValueError(f"topk needs 1 <= k <= n_latents ({n_latents}), got k={k}")
        self.k = int(k)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents, bias=bias)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        values, indices = self.sparse_forward(x, dictionary)
        return values.new_zeros(*values.shape[:-1], self.n_latents).scatter(-1, indices, values)

    def sparse_forward(self, x: Tensor, dictionary: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        self.check_input(x)
        values, indices = self.linear(self.centre(x, dictionary)).topk(self.k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode_flops(self) -> tuple[float, float]:
        # ReLU and the top-k selection (and the decoder-bias subtraction)
        return 2 * self.d_model * self.n_latents, 2 * self.n_latents + self.subtract_decoder_bias * self.d_model
