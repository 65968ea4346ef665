"""Evaluating a trained model: the held-out metrics every method reports (one path, for ``fit``, suites
and the frontier alike), and the downstream metrics a kind of data adds (CE-loss recovered and sparse
probing for language-model activations)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._modes import evaluating
from ..data.activations import ActivationDataModule
from ..data.base import SparseCodingData
from ..model import SparseCoder
from .held_out import context_fvu, context_sums, held_out_statistics
from .language_model import ce_baselines, ce_figures, ce_loss_recovered, ce_spliced, recovered_fraction
from .probing import TASKS, ProbeTask, ProbingConfig, sparse_probing


@torch.no_grad()
def held_out_pass(model: SparseCoder, datamodule: SparseCodingData
                  ) -> tuple[dict[str, float], dict[str, list[Tensor]] | None]:
    """One pass of the model over the held-out data, in eval mode: its held-out metrics (:func:`evaluate`) and,
    on language-model activations, the per-context sums (:func:`context_sums`, outlier tokens included there
    and left out of the metrics) that the standard errors and paired differences come from; else None."""
    metrics = model.new_metrics(sync_on_compute=False)  # every held-out batch is seen here
    sums = None
    with evaluating(model):
        if isinstance(datamodule, ActivationDataModule):
            sums = context_sums(model, datamodule, metrics)
        else:
            for batch in datamodule.held_out_batches():
                batch = (batch.to(model.device) if isinstance(batch, torch.Tensor)
                         else [t.to(model.device) for t in batch])
                model.update_metrics(metrics, batch)
        model.update_dictionary_metrics(metrics)
        return metrics.compute(), sums


def evaluate(model: SparseCoder, datamodule: SparseCodingData) -> dict[str, float]:
    """The model's held-out metrics (FVU, MSE, L0, L1, dead fraction; MCC and dictionary MCC where the
    data know the truth), computed on this process over every held-out batch, in eval mode, with the
    metrics and update the model's own test step uses."""
    return held_out_pass(model, datamodule)[0]


def downstream_metrics(model: SparseCoder, datamodule: SparseCodingData, probing: ProbingConfig | None = None,
                       sums: dict[str, list[Tensor]] | None = None) -> dict[str, Any]:
    """Metrics beyond the held-out reconstruction that the data make possible (none for synthetic data):
    on language-model activations, FVU with and without the outlier tokens with standard errors
    (:func:`held_out_statistics`), CE-loss recovered (:func:`ce_loss_recovered`) and k-sparse probing
    accuracy (:func:`sparse_probing`; ``probing``: its settings, default :class:`ProbingConfig`). ``sums``: the
    model's per-context sums from :func:`held_out_pass`, which spare a second pass over the held-out tokens."""
    if not isinstance(datamodule, ActivationDataModule):
        return {}
    probing = probing or ProbingConfig()
    return {**held_out_statistics(model, datamodule, sums), **ce_loss_recovered(model, datamodule),
            **(sparse_probing(model, datamodule, probing) if probing.enabled else {})}


__all__ = ["TASKS", "ProbeTask", "ProbingConfig", "ce_baselines", "ce_figures", "ce_loss_recovered", "ce_spliced",
           "context_fvu", "context_sums", "downstream_metrics", "evaluate", "held_out_pass", "held_out_statistics",
           "recovered_fraction", "sparse_probing"]
