"""BatchTopK SAE encoder (Bussmann et al. 2024): top-k over the whole batch in training, a threshold after."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderHead, SparseCodes, TrainingCodes
from .interop import ForeignSAE
from .linear import LinearPreActivations, linear_export, load_linear
from .registry import register_encoder
from ..distributed import smallest as distributed_smallest
from .topk import FIELD_SAE_DEFAULTS, AnnealedK, SparseTopKLinear, global_cutoff, require_k


@register_encoder("batchtopk")
class BatchTopKEncoder(AnnealedK, LinearPreActivations, EncoderHead):
    """In training, ``ReLU(W x + b)`` keeps the ``k x batch`` largest values of the whole batch, so
    samples share a budget of ``k`` latents on average. Like SAELens and dictionary_learning, it keeps a
    running estimate of the smallest kept value (``threshold``, an exponential moving average with rate
    ``threshold_lr``), and outside training each sample keeps the latents above it: a JumpReLU with one
    threshold, whose codes do not depend on the batch.

    Reproduces dictionary_learning's ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE``, whose inference is
    that threshold (SAELens saves its BatchTopK SAEs as ``jumprelu`` ones, which the jumprelu head loads).
    ``k_train_factor`` and ``k_anneal`` train with more latents per sample
    (:class:`~sae_zoo.encoders.topk.AnnealedK`); the threshold is then the smallest of each training batch's
    ``k x batch`` largest values, so inference keeps ``k`` per sample on average.

    ``threshold_on="contribution"`` sets the threshold on each code times its atom's norm (what the latent adds
    to the reconstruction) instead of on the code, where the dictionary learns its norms: a latent fires when
    it explains enough of the input, whatever the split between its code and its norm. Training still selects
    on the codes; the threshold estimate ranks the kept codes by contribution. It is a threshold per latent on
    the code (the threshold over the atom's norm), which is how it exports.
    """

    nonnegative_codes = True
    example_kwargs: dict[str, Any] = {"k": 3}
    architectures = ("batchtopk", "matryoshka_batchtopk")
    # and training at 1.25k (SynthSAEBench, 3 seeds each, at the same inference L0: F1 +0.030 on cpu2k, +0.037 on
    # cpu3k, MCC level), annealed from twice that over the first half (F1 +0.015 on cpu2k, +0.023 on cpu3k), at
    # lr 7e-3 warmed up over the first 10% of the steps rather than the top-k head's 3e-3 (cpu2k: F1 0.878
    # against 0.868 at 5e-3 without a warm-up, and 0.849 at 3e-3; README: SynthSAEBench)
    learned_dictionary_defaults = {**FIELD_SAE_DEFAULTS,
                                   "encoder": {**FIELD_SAE_DEFAULTS["encoder"], "k_anneal": 2.0,
                                               "k_train_factor": 1.25},
                                   "model": {**FIELD_SAE_DEFAULTS["model"], "lr": 7e-3, "lr_warmup_steps": 0.1}}

    def __init__(self, d_model: int, n_latents: int, k: int, threshold_lr: float = 0.01,
                 subtract_decoder_bias: bool = False, k_anneal: float = 1.0,
                 k_anneal_steps: int | float | None = None, k_anneal_fraction: float | None = None,
                 k_train_factor: float = 1.0, threshold_on: Literal["code", "contribution"] = "code") -> None:
        super().__init__(d_model, n_latents)
        require_k("batchtopk", k, n_latents)
        if not 0 < threshold_lr <= 1:
            raise ValueError(f"batchtopk needs 0 < threshold_lr <= 1, got threshold_lr={threshold_lr!r}")
        if threshold_on not in ("code", "contribution"):
            raise ValueError(f"batchtopk threshold_on must be 'code' or 'contribution', got {threshold_on!r}")
        self.k, self.threshold_lr, self.threshold_on = int(k), float(threshold_lr), threshold_on
        self.init_annealing(k_anneal, k_anneal_steps, k_anneal_fraction, k_train_factor)
        self.subtract_decoder_bias = bool(subtract_decoder_bias)
        self.linear = nn.Linear(d_model, n_latents)
        #: the running smallest kept activation; negative until the first training batch sets it
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, x: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        if self.training:
            return self.training_codes(x, dictionary, sparse=False).codes
        weights = self.contribution_weights(dictionary)
        if weights is None:  # ReLU then the threshold on the code: one pass, in place (the threshold is >= 0 once set)
            return F.threshold_(self.linear_map(x, dictionary), max(float(self.threshold), 0.0), 0.0)
        acts = self.linear_map(x, dictionary).relu()
        return acts * (acts * weights > self.threshold)

    def contribution_weights(self, dictionary: nn.Module | None) -> Tensor | None:
        """What each latent's code is weighed by before the threshold: its atom's norm with
        ``threshold_on="contribution"`` where the dictionary has norms; None (the code itself) otherwise."""
        norms = getattr(dictionary, "atom_norms", None) if self.threshold_on == "contribution" else None
        return None if norms is None else norms.detach()

    def training_codes(self, x: Tensor, dictionary: nn.Module | None = None, sparse: bool = True) -> TrainingCodes:
        if sparse:  # the same codes, as each sample's non-zero values (zero-padded to a common width)
            x = self.check_input(x, dictionary)
            codes = SparseCodes(*SparseTopKLinear.apply(self.centre(x, dictionary), self.linear.weight,
                                                        self.linear.bias, self.training_k, True))
            self._update_threshold(codes.values.detach().reshape(-1), codes.indices.reshape(-1),
                                   x.shape[:-1].numel(), dictionary)
            return TrainingCodes(codes)
        acts = self.linear_map(x, dictionary).relu()
        flat = acts.reshape(-1)
        samples = flat.numel() // self.n_latents
        cutoff = global_cutoff(flat, self.training_k, samples)
        if cutoff is None:
            kept = flat.topk(self.training_k * samples, sorted=False)  # k <= n_latents
            values, indices = kept.values, kept.indices
        else:  # a multi-device run: the global batch's top k x samples
            indices = (flat >= cutoff).nonzero().squeeze(-1)
            values = flat[indices]
        codes = torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)
        self._update_threshold(values.detach(), indices % self.n_latents, samples, dictionary)
        return TrainingCodes(codes)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor, latents: Tensor, samples: int, dictionary: nn.Module | None) -> None:
        # on the device, without a synchronisation: a batch with no positive value leaves it unchanged; while k
        # is annealed down the kept values are not train_k's, so the estimate starts when training reaches it. In a
        # multi-device run the kept values are the global batch's, and every rank takes the same smallest one.
        if self.training_k != self.train_k:
            return
        weights = self.contribution_weights(dictionary)
        if weights is not None:
            kept = kept * weights[latents]
        if self.train_k != self.k:  # inference keeps the k x samples largest of them
            cutoff = global_cutoff(kept, self.k, samples)
            kept = (kept.topk(min(kept.numel(), self.k * samples), sorted=False).values if cutoff is None
                    else kept[kept >= cutoff])
        kept = kept.to(self.threshold.dtype)
        local = torch.where(kept > 0, kept, torch.inf).min() if kept.numel() else kept.new_tensor(torch.inf)
        smallest = distributed_smallest(local)
        moved = torch.where(self.threshold < 0, smallest, torch.lerp(self.threshold, smallest, self.threshold_lr))
        self.threshold.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold))

    @property
    def forced_l0(self) -> int | None:
        return self.k

    def encode_flops(self) -> tuple[float, float]:
        # inference: ReLU, (the weighing by the atom norms,) the comparison and the mask (and the decoder-bias
        # subtraction)
        weighed = self.threshold_on == "contribution"
        return (2 * self.d_model * self.n_latents,
                (3 + weighed) * self.n_latents + self.subtract_decoder_bias * self.d_model)

    @classmethod
    def from_foreign(cls, sae: ForeignSAE) -> "BatchTopKEncoder":
        if sae.config.get("k") is None:
            raise ValueError(f"{sae.source}: a BatchTopK SAE needs 'k'")
        threshold = sae.require("threshold")["threshold"]
        if threshold.numel() != 1:
            raise ValueError(f"{sae.source}: a BatchTopK SAE keeps one 'threshold', got shape {tuple(threshold.shape)}")
        head = cls(sae.d_in, sae.n_latents, k=int(sae.config["k"]),
                   subtract_decoder_bias=bool(sae.config.get("apply_b_dec_to_input", True)))
        load_linear(head.linear, *sae.folded_encoder())
        head.threshold.fill_(float(threshold))
        return head

    def to_foreign(self, dictionary: nn.Module) -> ForeignSAE:
        # SAELens saves a BatchTopK SAE for inference as a JumpReLU SAE with the threshold on every latent; a
        # threshold on contributions is one on each code of the threshold over its atom's norm
        threshold = self.threshold.clamp_min(0).expand(self.n_latents)
        weights = self.contribution_weights(dictionary)
        return linear_export(self, dictionary, "jumprelu",
                             params={"threshold": threshold if weights is None else threshold / weights})
