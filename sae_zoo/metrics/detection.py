"""Latents as feature detectors, how many distinct features they track, and how much they shrink the
reconstruction: SynthSAEBench's metrics (Chanin & Garriga-Alonso 2026), streamed over batches."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from .functional import _detection_compute, _detection_update, _shrinkage_update, _uniqueness_update, best_matches
from .sparsity import _PerSampleMean


class LatentDetection(Metric):
    """Each latent as a binary detector of the true feature its atom matches best (largest ``|cosine|``):
    ``compute()`` gives the means over latents of precision, recall, F1 and accuracy.

    ``update(codes, true_codes, atoms, true_atoms)``: the matches are made from the first update's atoms
    after each reset (the dictionary is fixed during an evaluation) and kept as a state, so every rank
    uses the same ones.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_latents: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_latents = num_latents
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, default=torch.zeros(num_latents, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("matches", default=torch.full((num_latents,), -1, dtype=torch.long), dist_reduce_fx="max")

    def update(self, codes: Tensor, true_codes: Tensor, atoms: Tensor, true_atoms: Tensor) -> None:
        if atoms.shape[0] != self.num_latents or codes.shape[-1] != self.num_latents:
            raise ValueError(f"LatentDetection expects {self.num_latents} latents: codes (n, {self.num_latents}) and "
                             f"atoms ({self.num_latents}, d), got codes {tuple(codes.shape)} and atoms "
                             f"{tuple(atoms.shape)}")
        if true_codes.shape[-1] != true_atoms.shape[0] or true_codes.shape[0] != codes.shape[0]:
            raise ValueError(f"LatentDetection expects true codes (n, {true_atoms.shape[0]}) for the {codes.shape[0]} "
                             f"samples and {true_atoms.shape[0]} true atoms, got true codes {tuple(true_codes.shape)}")
        if int(self.matches[0]) < 0:
            self.matches = best_matches(atoms, true_atoms).to(self.matches.device)
        tp, fp, fn, tn = _detection_update(codes, true_codes, self.matches)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += tn

    def compute(self) -> dict[str, Tensor]:
        return _detection_compute(self.tp, self.fp, self.fn, self.tn)


class FeatureUniqueness(_PerSampleMean):
    """Distinct true features among the latents' best matches over the number of latents; each
    ``update(atoms, true_atoms)`` adds one snapshot of the dictionary, ``compute`` is their mean."""

    higher_is_better = True
    _update = staticmethod(_uniqueness_update)


class Shrinkage(_PerSampleMean):
    """Mean over samples of ``||x_hat|| / ||x||`` (samples with ``||x|| <= 1e-6`` left out):
    ``update(x_hat, x)``."""

    higher_is_better = None
    _update = staticmethod(_shrinkage_update)


__all__ = ["FeatureUniqueness", "LatentDetection", "Shrinkage"]
