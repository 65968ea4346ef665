"""Gated SAE encoder (Rajamanoharan et al. 2024): which latents fire and how strongly, on shared weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead, TrainingCodes
from .interop import ForeignSAE
from .registry import register_encoder


@register_encoder("gated")
class GatedEncoder(EncoderHead):
    """``codes = 1[W x + b_gate > 0] * ReLU(exp(r_mag) * (W x) + b_mag)``: the gate path decides which
    latents fire, the magnitude path (the same ``W``, rescaled per latent by ``exp(r_mag)``) how strongly.

    The gate has no gradient, so training adds the paper's two terms: the sparsity penalty is the L1 of
    ``ReLU(W x + b_gate)`` (times the atom norms), and ``aux_loss`` asks that gate path alone to
    reconstruct ``x`` through a frozen copy of the decoder. Reproduces SAELens's ``gated`` SAE.
    """

    nonnegative_codes = True
    architectures = ("gated",)

    def __init__(self, d_model: int, n_latents: int, subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents, bias=False)
        self.b_gate = nn.Parameter(torch.zeros(n_latents))
        self.r_mag = nn.Parameter(torch.zeros(n_latents))
        self.b_mag = nn.Parameter(torch.zeros(n_latents))

    def _paths(self, x: Tensor, dictionary: nn.Module | None) -> tuple[Tensor, Tensor]:
        z = self.linear(self.centre(self.check_input(x, dictionary), dictionary))
        return z + self.b_gate, z * self.r_mag.exp() + self.b_mag

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        gate, magnitude = self._paths(x, dictionary)
        return (gate > 0) * magnitude.relu()

    def training_codes(self, x: Tensor, dictionary: nn.Module | None = None, sparse: bool = True) -> TrainingCodes:
        if dictionary is None:
            raise ValueError("the gated head trains against the dictionary: training_codes(x, dictionary)")
        gate, magnitude = self._paths(x, dictionary)
        gate_acts = gate.relu()
        norms = getattr(dictionary, "atom_norms", None)
        sparsity = (gate_acts if norms is None else gate_acts * norms).mean()
        via_gate = gate_acts @ dictionary.atoms.detach()
        if dictionary.bias is not None:
            via_gate = via_gate + dictionary.bias.detach()
        return TrainingCodes((gate > 0) * magnitude.relu(), sparsity=sparsity,
                             aux_loss=F.mse_loss(via_gate, x.to(via_gate.dtype)))

    def firing_margins(self, x: Tensor, dictionary: nn.Module | None) -> Tensor | None:
        # the gate decides which latents fire, among those whose magnitude is positive (the others, below any gate)
        gate, magnitude = self._paths(x, dictionary)
        return torch.where(magnitude > 0, gate, gate.detach().min() - 1)

    @torch.no_grad()
    def shift_thresholds(self, delta: Tensor) -> None:
        self.b_gate.sub_(delta)

    def encode_flops(self) -> tuple[float, float]:
        # one product; gate bias and comparison, magnitude scale, bias and ReLU, the product of both (2N + 4N)
        return 2 * self.d_model * self.n_latents, 6 * self.n_latents + self.subtract_decoder_bias * self.d_model

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "GatedEncoder":
        tensors = sae.require("W_enc", "b_gate", "r_mag", "b_mag")
        head = cls(sae.d_model, sae.n_latents, subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", True)))
        with torch.no_grad():
            head.linear.weight.copy_(tensors["W_enc"])
            for name in ("b_gate", "r_mag", "b_mag"):
                getattr(head, name).copy_(tensors[name])
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        return ForeignSAE.of_dictionary("gated", dictionary, W_enc=self.linear.weight,
                                        config={"apply_b_dec_to_input": self.subtract_decoder_bias},
                                        params={n: getattr(self, n) for n in ("b_gate", "r_mag", "b_mag")})
