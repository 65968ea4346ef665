"""MLP encoder: a deeper amortised encoder (the paper's Linear-ReLU-Linear-ReLU)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import EncoderHead
from .registry import register_encoder


@register_encoder("mlp")
class MLPEncoder(EncoderHead):
    """``codes = ReLU(W_L ... ReLU(W_1 x + b_1) ... + b_L)`` with hidden widths ``hidden``.

    ``hidden`` is one width (one hidden layer, as in the paper) or a list of widths.
    """

    nonnegative_codes = True
    example_kwargs = {"hidden": 8}

    def __init__(self, d_model: int, n_latents: int, hidden: int | Sequence[int] = 256, bias: bool = True) -> None:
        super().__init__(d_model, n_latents)
        widths = [int(hidden)] if isinstance(hidden, int) else [int(h) for h in hidden]
        if not widths or min(widths) < 1:
            raise ValueError(f"mlp needs one or more hidden widths >= 1, got hidden={hidden!r}")
        layers: list[nn.Module] = []
        for d_in, d_out in zip([d_model, *widths], [*widths, n_latents]):
            layers += [nn.Linear(d_in, d_out, bias=bias), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        return self.net(self.check_input(x, dictionary))

    def encode_flops(self) -> tuple[float, float]:
        layers = [m for m in self.net if isinstance(m, nn.Linear)]
        return sum(2 * m.in_features * m.out_features for m in layers), sum(m.out_features for m in layers)
