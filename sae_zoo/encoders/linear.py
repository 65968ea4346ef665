"""The sparse autoencoder's encoder: one linear map and a ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead
from .interop import ForeignSAE
from .registry import register_encoder


class LinearPreActivations:
    """For heads whose pre-activations are one linear map, ``self.linear`` of the centred input: the
    pre-activations of chosen latents (AuxK) and resetting latents' encoder rows (resampling)."""

    def linear_map(self, x: Tensor, dictionary: nn.Module | None) -> Tensor:
        """Every latent's pre-activation: ``self.linear`` of the checked, centred input."""
        return self.centred_linear(self.check_input(x, dictionary), dictionary, self.linear.weight, self.linear.bias)

    def pre_activations(self, x: Tensor, dictionary: nn.Module | None, latents: Tensor) -> Tensor:
        x = self.centre(self.check_input(x, dictionary), dictionary)
        bias = None if self.linear.bias is None else self.linear.bias[latents]
        return F.linear(x, self.linear.weight[latents], bias)

    @torch.no_grad()
    def reset_latents(self, latents: Tensor, directions: Tensor) -> list[nn.Parameter]:
        # Anthropic's resampling: the new encoder row is the direction at 0.2 x the mean norm of the live rows
        weight = self.linear.weight
        live = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        live[latents] = False
        scale = 0.2 * (weight[live].norm(dim=1).mean() if live.any() else weight.norm(dim=1).mean())
        weight[latents] = directions.to(weight.dtype) * scale
        if self.linear.bias is not None:
            self.linear.bias[latents] = 0
        return [p for p in (self.linear.weight, self.linear.bias) if p is not None]


@register_encoder("linear")
class LinearEncoder(LinearPreActivations, EncoderHead):
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
        return F.relu(self.linear_map(x, dictionary))

    def firing_margins(self, x: Tensor, dictionary: nn.Module | None) -> Tensor | None:
        return None if self.linear.bias is None else self.linear_map(x, dictionary)

    @torch.no_grad()
    def shift_thresholds(self, delta: Tensor) -> None:
        self.linear.bias.sub_(delta)

    def encode_flops(self) -> tuple[float, float]:
        return 2 * self.d_model * self.n_latents, self.n_latents + self.subtract_decoder_bias * self.d_model

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "LinearEncoder":
        head = cls(sae.d_in, sae.n_latents, subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", True)))
        load_linear(head.linear, *sae.folded_encoder())
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        return linear_export(self, dictionary, "standard")


def load_linear(linear: nn.Linear, weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def linear_export(head: EncoderHead, dictionary: nn.Module, architecture: str, params: dict[str, Tensor] | None = None,
                  **config) -> ForeignSAE:
    """A head built on one ``nn.Linear`` (``head.linear``) with the dictionary, as ``architecture``."""
    bias = head.linear.bias
    return ForeignSAE.of_dictionary(architecture, dictionary, W_enc=head.linear.weight,
                                    b_enc=torch.zeros(head.n_latents) if bias is None else bias,
                                    config={"apply_b_dec_to_input": head.subtract_decoder_bias, **config},
                                    params=params)
