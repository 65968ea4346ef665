"""Top-k SAE encoder: keep the k largest pre-activations of a linear map."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import kth_largest, summed, world_size
from ..schedules import steps_or_fraction
from .base import EncoderHead, SparseCodes, require_at_least
from .interop import ForeignSAE
from .linear import LinearPreActivations, linear_export, load_linear
from .registry import register_encoder
from .sparse_linear import linear_grads_at


#: How the field's top-k SAEs train best (SynthSAEBench cpu2k, README): a decoder bias subtracted before
#: encoding, the encoder started as the decoder's transpose, a learned norm per atom, and Adam at 3e-3
#: decayed linearly to 0 over the last 20% of the steps.
FIELD_SAE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dictionary": {"bias": True, "atom_norms": "learned"},
    "encoder": {"subtract_decoder_bias": True},
    "model": {"tied_init": True, "lr": 3e-3, "lr_decay_steps": 0.2},
}


def require_k(head: str, k: int, n_latents: int) -> None:
    require_at_least(head, 1, k=k)
    if k > n_latents:
        raise ValueError(f"{head} needs k <= n_latents ({n_latents}), got k={k}")


class AnnealedK:
    """How many latents a top-k head keeps per sample in training, when that is not ``k``.

    * ``k_train_factor``: training keeps ``train_k = k_train_factor * k`` latents per sample (rounded half
      up, at most ``n_latents``), inference ``k``. The dictionary learns from denser codes, and inference keeps the
      strongest ``k`` of them: on SynthSAEBench each latent then fires less often without its feature.
    * ``k_anneal``: training starts with ``k_anneal`` times ``train_k`` and comes down linearly to
      ``train_k`` over ``k_anneal_steps`` (steps, or a fraction of the run as for every schedule:
      :mod:`sae_zoo.schedules`; half the run by default; ``k_anneal_fraction`` is its older spelling, a fraction in
      (0, 1]). Denser early steps give every latent gradient while the dictionary takes shape.

    ``training_k`` is the k of the current step."""

    def init_annealing(self, k_anneal: float, k_anneal_steps: int | float | None, k_anneal_fraction: float | None,
                       k_train_factor: float = 1.0) -> None:
        if k_anneal_steps is not None and k_anneal_fraction is not None:
            raise ValueError(f"{self.name}: k_anneal_steps={k_anneal_steps!r} and k_anneal_fraction="
                             f"{k_anneal_fraction!r} both set how long k anneals; give k_anneal_steps alone")
        if k_anneal_fraction is not None and not 0 < k_anneal_fraction <= 1:
            raise ValueError(f"{self.name} needs 0 < k_anneal_fraction <= 1, got k_anneal_fraction={k_anneal_fraction!r}")
        if not k_anneal >= 1:
            raise ValueError(f"{self.name} needs k_anneal >= 1, got k_anneal={k_anneal!r}")
        if not k_train_factor >= 1:
            raise ValueError(f"{self.name} needs k_train_factor >= 1 (training keeps at least the k of inference), "
                             f"got k_train_factor={k_train_factor!r}")
        #: how long k anneals: steps (an int) or a fraction of the run (a float)
        self.k_anneal_length = (float(k_anneal_fraction) if k_anneal_fraction is not None else 0.5
                                if k_anneal_steps is None else steps_or_fraction(k_anneal_steps, "k_anneal_steps"))
        self.k_anneal = float(k_anneal)
        self.k_train_factor = float(k_train_factor)
        self.train_k = min(self.n_latents, math.floor(self.k * self.k_train_factor + 0.5))
        self.training_k = self.train_k

    def on_train_progress(self, progress: float | None, step: int = 0) -> None:
        if self.k_anneal == 1:
            return
        length = self.k_anneal_length
        if isinstance(length, float) and progress is None:
            raise ValueError(f"{self.name} anneals k over a fraction of the run (k_anneal={self.k_anneal}), which "
                             "needs a known number of training steps: set trainer.max_steps, or give k_anneal_steps "
                             "in steps")
        done = progress / length if isinstance(length, float) else step / length if length else 1.0
        left = max(0.0, 1 - done)
        self.training_k = min(self.n_latents, round(self.train_k * (1 + (self.k_anneal - 1) * left)))


@register_encoder("topk")
class TopKEncoder(AnnealedK, LinearPreActivations, EncoderHead):
    """``codes = ReLU(TopK_k(W x + b))``: every other latent is set to zero.

    ``subtract_decoder_bias=True`` encodes ``x - b_dec``, as SAELens, sparsify and dictionary_learning do.
    ``k_train_factor`` and ``k_anneal`` train with more latents per sample (:class:`AnnealedK`).
    Reproduces SAELens's ``topk`` SAE (and sparsify's and dictionary_learning's top-k SAEs).
    """

    nonnegative_codes = True
    example_kwargs = {"k": 3}
    architectures = ("topk",)
    learned_dictionary_defaults = FIELD_SAE_DEFAULTS

    def __init__(self, d_model: int, n_latents: int, k: int, bias: bool = True,
                 subtract_decoder_bias: bool = False, k_anneal: float = 1.0,
                 k_anneal_steps: int | float | None = None, k_anneal_fraction: float | None = None,
                 k_train_factor: float = 1.0) -> None:
        super().__init__(d_model, n_latents)
        require_k("topk", k, n_latents)
        self.k = int(k)
        self.init_annealing(k_anneal, k_anneal_steps, k_anneal_fraction, k_train_factor)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents, bias=bias)

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        if not torch.is_grad_enabled():
            # the codes written over the pre-activations: no fresh (batch, n_latents) tensor, whose first touch of
            # memory costs on a CPU about as much as the matmul's own output
            x = self.check_input(x, dictionary)
            pre = F.linear(self.centre(x, dictionary), self.linear.weight, self.linear.bias)  # as sparse_forward's
            values, indices = pre.topk(self.training_k if self.training else self.k, dim=-1, sorted=False)
            return pre.zero_().scatter_(-1, indices, values.clamp_min_(0))
        values, indices = self.sparse_forward(x, dictionary)
        return values.new_zeros(*values.shape[:-1], self.n_latents).scatter(-1, indices, values)

    def sparse_forward(self, x: Tensor, dictionary: nn.Module | None = None) -> SparseCodes:
        x = self.check_input(x, dictionary)
        return SparseCodes(*SparseTopKLinear.apply(self.centre(x, dictionary), self.linear.weight, self.linear.bias,
                                                   self.training_k if self.training else self.k))

    @property
    def forced_l0(self) -> int | None:
        return self.k

    def encode_flops(self) -> tuple[float, float]:
        # ReLU and the top-k selection (and the decoder-bias subtraction)
        return 2 * self.d_model * self.n_latents, 2 * self.n_latents + self.subtract_decoder_bias * self.d_model

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "TopKEncoder":
        """SAELens's ``rescale_acts_by_decoder_norm`` selects on pre-activations times the decoder norms
        and decodes through unit atoms: the norms fold into the encoder (see :attr:`ForeignSAE.keeps_norms`)."""
        if sae.config.get("k") is None:
            raise ValueError(f"{sae.source}: a top-k SAE needs 'k'")
        head = cls(sae.d_in, sae.n_latents, k=int(sae.config["k"]),
                   subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", True)))
        load_linear(head.linear, *sae.folded_encoder())
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        return linear_export(self, dictionary, "topk", k=self.k, rescale_acts_by_decoder_norm=False)


def global_cutoff(values: Tensor, k: int, samples: int) -> Tensor | None:
    """In a multi-device run, the ``k x (every rank's samples)``-th largest of every rank's ``values``: the
    smallest value a batch-wide top-k over the global batch keeps. None in a single process."""
    if world_size() == 1:
        return None
    return kth_largest(values.detach(), k * int(summed(torch.tensor(samples, device=values.device))))


def batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``ReLU`` of the ``k x samples`` largest of ``pre`` ``(samples, n_latents)`` over the whole batch, as
    ``(values, indices)`` of shape ``(samples, m)``: each sample's ``m`` largest pre-activations, the ones
    outside the batch's top ``k x samples`` set to 0. ``m`` starts at ``4k`` and doubles while some sample
    keeps all of its ``m`` positive candidates (it might keep more), so the kept codes are exactly the
    batch-wide top-k's, found without sorting all ``samples x n_latents`` values. In a multi-device run the batch
    is the global one: a rank keeps its values at or above the ``k x samples``-th largest of every rank's
    (:func:`~sae_zoo.distributed.kth_largest`), as one process given the whole batch would."""
    samples, n_latents = pre.shape
    budget, m = k * samples, min(n_latents, 4 * k)
    cutoff = global_cutoff(pre, k, samples)
    while True:
        values, indices = pre.topk(m, dim=-1, sorted=True)
        if cutoff is None:
            flat = values.reshape(-1)
            kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, flat.topk(min(budget, flat.numel()),
                                                                                 sorted=False).indices, True)
            kept = kept.reshape(samples, m)
        else:
            kept = values >= cutoff
        # a sample whose smallest candidate is kept and positive might keep more (non-positive ones add nothing)
        if m == n_latents or not bool((kept[:, -1] & (values[:, -1] > 0)).any()):
            return values.clamp_min(0) * kept, indices
        m = min(n_latents, 2 * m)


class SparseTopKLinear(torch.autograd.Function):
    """``ReLU(TopK_k(x W^T + b))`` as ``(values, indices)``; with ``batch=True`` the batch-wide top
    ``k x samples`` instead (:func:`batch_topk`: zeros pad each sample's codes to a common width). The
    forward is the dense product; the backward touches only the selected rows of ``W`` per sample (a gather
    for the input gradient, an ``index_add`` for the weight's), instead of two more dense
    ``n_latents``-wide products."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int, batch: bool = False
                ) -> tuple[Tensor, Tensor]:
        pre = F.linear(x, weight, bias)
        if batch:
            values, indices = batch_topk(pre.reshape(-1, pre.shape[-1]), k)
            values, indices = values.reshape(*pre.shape[:-1], -1), indices.reshape(*pre.shape[:-1], -1)
        else:
            values, indices = pre.topk(k, dim=-1, sorted=False)
            values = values.clamp_min(0)
        ctx.save_for_backward(x, weight, indices, values)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, grad_indices: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, indices, values = ctx.saved_tensors
        grad = grad_values * (values > 0)  # through the ReLU
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return (*linear_grads_at(x, weight, indices, grad, needs), None, None)
