"""MLP encoders: a deeper amortised encoder (the paper's Linear-ReLU-Linear-ReLU), and an SAE's encoder
with a learned MLP correction, to upgrade a trained SAE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import EncoderHead, require_at_least
from .iterative import keep_topk
from .linear import LinearPreActivations
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


@register_encoder("residual_mlp")
class ResidualMLPEncoder(LinearPreActivations, EncoderHead):
    """``codes = act(W x + b + MLP(x))``: an SAE's linear encoder plus an MLP correction whose last layer
    starts at zero. Built with :meth:`upgrading` from an SAE's own head, it starts with exactly that SAE's
    codes, so training on the SAE's frozen decoder moves it from the SAE, not from scratch.

    ``act`` is a ReLU; with ``k``, the ReLU of the top ``k`` (a top-k SAE); with ``jump=True``, a JumpReLU
    with fixed per-latent thresholds (a JumpReLU or BatchTopK SAE, at inference). ``subtract_decoder_bias``
    encodes ``x - b_dec``, as the SAE did.
    """

    nonnegative_codes = True
    example_kwargs = {"hidden": 8}
    #: the SAE encoders :meth:`upgrading` starts from
    sources = ("linear", "topk", "jumprelu", "batchtopk")

    def __init__(self, d_model: int, n_latents: int, hidden: int = 256, k: int | None = None, jump: bool = False,
                 subtract_decoder_bias: bool = False) -> None:
        super().__init__(d_model, n_latents)
        require_at_least("residual_mlp", 1, hidden=hidden, k=k)
        if k is not None and jump:
            raise ValueError("residual_mlp takes k (a top-k SAE) or jump=True (a JumpReLU SAE), not both")
        self.k, self.subtract_decoder_bias = k, bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents)
        self.correction = nn.Sequential(nn.Linear(d_model, int(hidden)), nn.ReLU(), nn.Linear(int(hidden), n_latents))
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)
        self.register_buffer("threshold", torch.zeros(n_latents) if jump else None)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        x = self.centre(self.check_input(x, dictionary), dictionary)
        z = self.linear(x) + self.correction(x)
        if self.threshold is not None:
            return z.relu() * (z > self.threshold)
        return keep_topk(z.relu(), self.k)

    def firing_margins(self, x: Tensor, dictionary: nn.Module | None) -> Tensor | None:
        if self.k is not None or self.threshold is not None:
            return None  # top-k keeps k; a JumpReLU SAE's thresholds are fixed
        x = self.centre(self.check_input(x, dictionary), dictionary)
        return self.linear(x) + self.correction(x)

    @torch.no_grad()
    def shift_thresholds(self, delta: Tensor) -> None:
        self.linear.bias.sub_(delta)

    @property
    def forced_l0(self) -> int | None:
        return self.k

    def encode_flops(self) -> tuple[float, float]:
        hidden = self.correction[0].out_features
        matmul = 2 * self.d_model * self.n_latents + 2 * self.d_model * hidden + 2 * hidden * self.n_latents
        return matmul, 2 * self.n_latents + hidden + (self.k is not None) * self.n_latents

    @classmethod
    def upgrading(cls, head: EncoderHead, hidden: int = 256, k: int | None = None) -> "ResidualMLPEncoder":
        """A residual MLP whose codes start as ``head``'s: a ReLU (``linear``), top-k (``topk``), JumpReLU
        (``jumprelu``) or BatchTopK (``batchtopk``, as at inference: one threshold) SAE's encoder. ``k``
        replaces a top-k SAE's own (its codes then start as that SAE's with this k)."""
        kinds = dict(zip(cls.sources, ({}, {"k": k or getattr(head, "k", None)}, {"jump": True}, {"jump": True})))
        if head.name not in kinds or getattr(head, "linear", None) is None:
            raise ValueError(f"residual_mlp starts from a linear, topk, jumprelu or batchtopk SAE's encoder, not "
                             f"{head.name!r}")
        if k is not None and head.name != "topk":
            raise ValueError(f"residual_mlp: k replaces a top-k SAE's k; a {head.name!r} SAE has none")
        new = cls(head.d_model, head.n_latents, hidden=hidden, subtract_decoder_bias=head.subtract_decoder_bias,
                  **kinds[head.name])
        with torch.no_grad():
            new.linear.weight.copy_(head.linear.weight)
            new.linear.bias.copy_(head.linear.bias if head.linear.bias is not None else 0)
            if new.threshold is not None:
                new.threshold.copy_(head.threshold.detach().clamp_min(0).expand(head.n_latents))
        return new.to(head.linear.weight.device)
