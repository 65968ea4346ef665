"""Upgrade an existing SAE: keep its decoder, try other encoders on it, and judge them at the SAE's own L0.

:func:`upgrade` (``sae-zoo upgrade SOURCE``):

1. loads the SAE (anything :func:`~sae_zoo.hub.load_sae` reads: a catalogue name, a SAELens, sparsify,
   dictionary_learning or Gemma Scope checkpoint, a sae_zoo model or run) and the language model, hook
   and input scaling it was trained on (from its metadata, or options);
2. collects activations there with the activation cache (a sae_zoo run reuses its own);
3. measures the SAE's own encoder: L0, FVU without and with the outlier tokens, CE-loss recovered, k-sparse
   probing accuracy (:func:`~sae_zoo.evaluation.sparse_probing`);
4. sweeps each candidate's sparsity knob around the SAE's L0, on the frozen decoder. The trained
   candidates (the SAE's encoder trained further; a residual MLP that starts as the SAE's encoder) learn
   together from one pass over the activations (:class:`~sae_zoo.multihead.HeadBank`); the iterative
   ones (FISTA warm-started from the SAE, matching pursuit, ITO) only infer;
5. writes ``comparison.csv`` (every point), ``comparison.md`` and ``comparison.png`` (FVU and CE-loss
   recovered against L0, with each candidate's values at the SAE's L0, interpolated between its points; the
   probing accuracies at that L0 in a second table),
   and, per candidate, the model at the point nearest the SAE's L0 with its card (``cards/NAME``, ready
   for ``sae-zoo push``).

A transcoder upgrades the same way, scored on its target hook, with its skip term frozen beside its decoder;
only the amortised candidates apply (an iterative one reconstructs its input through the decoder, which
writes the target instead).

Sweep knobs: a target L0 that tunes the L1 coefficient (ReLU and JumpReLU heads) or k (top-k heads), and
k for the iterative heads (they keep their k largest codes). Their L1 coefficient is the one at which the
SAE's own codes are closest to optimal (:func:`stationary_l1`), since an SAE's training coefficient is
rarely published.

Candidates are a registry (:data:`CANDIDATES`): a new one is one :class:`Candidate`, registered with
:func:`register_candidate`. The package is split by job: :mod:`.candidates`, :mod:`.sweep` (the run) and
:mod:`.report` (the tables, plot and cards). Progress is logged (``logging``, logger ``sae_zoo.upgrade``).

The output folder's ``upgrade.json`` records what the upgrade is. Run again, the same upgrade resumes
(finished points and trained models are kept); a different one is refused.
"""

from __future__ import annotations


from .candidates import CANDIDATES, Built, Candidate, PointKey, Start, register_candidate, stationary_l1
from .report import at_l0
from .sweep import UpgradeOptions, parse_ratios, upgrade

__all__ = ["CANDIDATES", "Built", "Candidate", "PointKey", "Start", "UpgradeOptions", "at_l0", "parse_ratios",
           "register_candidate", "stationary_l1", "upgrade"]
