"""The sparse autoencoder's encoder: one linear map and a ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead
from .interop import ForeignSAE
from .registry import register_encoder


@register_encoder("linear")
class LinearEncoder(EncoderHead):
    """``codes = ReLU(W x + b)``: the standard SAE encoder (the paper's "L-NL" encoder).

    With ``subtract_decoder_bias=True`` it encodes ``x - b_dec`` (the dictionary's bias), as
    SAELens, sparsify and dictionary_learning do. Reproduces SAELens's ``standard`` SAE (and
    dictionary_learning's ``AutoEncoder``).
    """

    nonnegative_codes = True
    architectures = ("standard",)

    def __init__(self, d_model: int, n_latents: int, bias: bool = True, subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents, bias=bias)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        x = self.check_input(x, dictionary)
        return F.relu(self.linear(self.centre(x, dictionary)))

    def encode_flops(self) -> tuple[float, float]:
        return 2 * self.d_model * self.n_latents, self.n_latents + self.subtract_decoder_bias * self.d_model

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "LinearEncoder":
        # ReLU(n z) = n ReLU(z) for n > 0: scaling latent i's encoder row by its atom's norm makes
        # code_i * unit_atom_i equal the source's code_i * W_dec_i
        tensors, norms = sae.require("W_enc", "b_enc"), sae.decoder_norms
        head = cls(sae.d_model, sae.n_latents, subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", True)))
        load_linear(head.linear, tensors["W_enc"] * norms[:, None], tensors["b_enc"] * norms)
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        return linear_export(self, dictionary, "standard")


def load_linear(linear: nn.Linear, weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def linear_export(head: EncoderHead, dictionary: nn.Module, architecture: str, **config) -> ForeignSAE:
    """A head built on one ``nn.Linear`` (``head.linear``) with the dictionary, as ``architecture``."""
    weight, bias = head.linear.weight.detach().float().cpu(), head.linear.bias
    return ForeignSAE(architecture, W_dec=dictionary.weight.detach().float().cpu(),
                      b_dec=None if dictionary.bias is None else dictionary.bias.detach().float().cpu(),
                      W_enc=weight, b_enc=torch.zeros(head.n_latents) if bias is None else bias.detach().float().cpu(),
                      config={"apply_b_dec_to_input": head.subtract_decoder_bias, **config})
