"""LISTA: ISTA unrolled into a fixed number of layers with learned weights (Gregor & LeCun, 2010)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import EncoderHead, require_at_least
from .iterative import lipschitz_constant
from .registry import register_encoder


@register_encoder("lista")
class LISTAEncoder(EncoderHead):
    """LISTA: ISTA unrolled into ``layers`` learned layers (an amortised head).

    ``s_0 = 0``, ``s_{t+1} = ReLU(x W^T + s_t S - theta_t)`` for ``layers`` layers; ``W``, ``S`` shared
    across layers, one threshold vector per layer. An amortised head, trained like any other.

    The first forward pass that sees a dictionary sets the weights to the ISTA iteration for it
    (``W = D / L``, ``S = I - D D^T / L``, ``theta = l1_coeff M / (2 N L)``), so training starts from
    ``layers`` steps of ISTA and learns from there.
    """

    reads_dictionary = True  # it starts as ISTA's steps on the dictionary
    nonnegative_codes = True
    example_kwargs = {"layers": 3}

    def __init__(self, d_model: int, n_latents: int, layers: int = 16, l1_coeff: float = 0.01) -> None:
        super().__init__(d_model, n_latents)
        require_at_least("lista", 1, layers=layers)
        require_at_least("lista", 0, l1_coeff=l1_coeff)
        self.layers, self.l1_coeff = int(layers), float(l1_coeff)
        self.input_weight = nn.Parameter(torch.randn(n_latents, d_model) / d_model**0.5)
        self.lateral = nn.Parameter(torch.eye(n_latents))
        self.thresholds = nn.Parameter(torch.zeros(self.layers, n_latents))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_from_dictionary(self, atoms: Tensor) -> None:
        lipschitz = lipschitz_constant(atoms)
        self.input_weight.copy_(atoms / lipschitz)
        self.lateral.copy_(torch.eye(self.n_latents, dtype=atoms.dtype, device=atoms.device) - atoms @ atoms.T / lipschitz)
        self.thresholds.fill_(float(self.l1_coeff * self.d_model / (2 * self.n_latents) / lipschitz))
        self.initialised.fill_(True)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        x = self.check_input(x, dictionary)
        if not self.initialised and dictionary is not None:
            self.init_from_dictionary(dictionary.atoms.detach())
        drive = x @ self.input_weight.T
        codes = torch.relu(drive - self.thresholds[0])
        for layer in range(1, self.layers):
            codes = torch.relu(drive + codes @ self.lateral - self.thresholds[layer])
        return codes

    def encode_flops(self) -> tuple[float, float]:
        m, n, hidden_layers = self.d_model, self.n_latents, self.layers - 1
        return 2 * m * n + hidden_layers * 2 * n * n, 2 * n + hidden_layers * 3 * n
