"""Evaluating a trained model: the held-out metrics every method reports (one path, for ``fit``, suites,
the frontier and upgrades alike), and the downstream metrics a kind of data adds (CE-loss recovered and
sparse probing for language-model activations), from one pass of the model over the held-out data into
an :class:`Evaluation`."""

from __future__ import annotations

import torch

from .._modes import evaluating
from ..data.base import LanguageModelData, SparseCodingData, move
from ..model import SparseCoder
from .held_out import ContextSums, TokenSums, check_pairing, token_sums
from .language_model import CELosses, ce_baselines, ce_loss_recovered, ce_spliced
from .probing import TASKS, Probe, ProbeTask, ProbingConfig, probe_tallies, sparse_probing
from .result import Evaluation, paired_gain_se


@torch.no_grad()
def held_out_pass(model: SparseCoder, datamodule: SparseCodingData) -> Evaluation:
    """One pass of the model over the held-out data, in eval mode: its test metrics (:func:`evaluate`) and, on
    language-model activations, its per-context sums (:func:`~sae_zoo.evaluation.held_out.token_sums`, outlier
    tokens counted there and left out of the metrics)."""
    metrics = model.new_metrics(sync_on_compute=False)  # every held-out batch is seen here
    tokens = None
    with evaluating(model):
        if isinstance(datamodule, LanguageModelData):
            tokens = token_sums(model, datamodule, metrics)
        else:
            check_pairing(model, datamodule)
            for batch in datamodule.held_out_batches():
                model.update_metrics(metrics, move(batch, model.device))
        model.update_dictionary_metrics(metrics)
        return Evaluation(metrics.compute(), tokens)


def evaluate(model: SparseCoder, datamodule: SparseCodingData) -> dict[str, float]:
    """The model's held-out metrics (FVU, MSE, L0, L1, dead fraction; MCC and dictionary MCC where the
    data know the truth), computed on this process over every held-out batch, in eval mode, with the
    metrics and update the model's own test step uses."""
    return held_out_pass(model, datamodule).metrics


def evaluate_model(model: SparseCoder, datamodule: SparseCodingData, probing: ProbingConfig | None = None,
                   baselines: CELosses | None = None) -> Evaluation:
    """Everything measured of the model on held-out data (:class:`Evaluation`; ``.figures()`` gives the figures):
    the held-out pass (:func:`held_out_pass`) and what the data make possible beyond it (nothing for synthetic
    data). On language-model activations: CE-loss recovered (``baselines``, :func:`ce_baselines`, spare the clean
    and zero-ablated LM passes when many models are measured on the same data) and k-sparse probing
    (``probing``: its settings, default :class:`ProbingConfig`; ``ProbingConfig(enabled=False)`` skips it)."""
    evaluation = held_out_pass(model, datamodule)
    if isinstance(datamodule, LanguageModelData):
        probing = probing or ProbingConfig()
        evaluation.ce = ce_spliced(model, datamodule, baselines)
        evaluation.probes = probe_tallies(model, datamodule, probing) if probing.enabled else {}
    return evaluation


__all__ = ["TASKS", "CELosses", "ContextSums", "Evaluation", "Probe", "ProbeTask", "ProbingConfig", "TokenSums",
           "ce_baselines", "ce_loss_recovered", "ce_spliced", "evaluate", "evaluate_model", "held_out_pass",
           "paired_gain_se", "probe_tallies", "sparse_probing"]
