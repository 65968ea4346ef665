"""One model's evaluation on held-out data, as named sufficient statistics: the test metrics, and on
language-model activations the per-context sums, the per-context next-token losses and the per-document
probe tallies. Every figure, standard error and paired gain is computed from it, so one pass of the model
serves them all, and two models measured on the same held-out data can be compared pair by pair."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from .bootstrap import bootstrap_se
from .held_out import ContextSums, TokenSums
from .language_model import CELosses
from .probing import Probe, probing_figures


@dataclass
class Evaluation:
    """What :func:`~sae_zoo.evaluation.evaluate_model` measures of one model.

    ``metrics``: the test metrics (FVU, L0, dead latents, ...; code recovery where the data know the truth).
    ``tokens``: per-context FVU sums without and with the outlier tokens (:class:`TokenSums`); ``ce``: per-context
    losses, clean, zero-ablated and with the reconstruction spliced in (:class:`CELosses`); ``probes``: each probe's
    per-document hits (:func:`~sae_zoo.evaluation.probing.probe_hits`). The last three exist on language-model
    activations only.
    """

    metrics: dict[str, Any]
    tokens: TokenSums | None = None
    ce: CELosses | None = None
    probes: dict[Probe, Tensor] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """Every figure a run reports: the test metrics, then FVU with and without the outlier tokens with their
        standard errors (they replace the metrics' FVU: the same tokens, summed in float64), CE-loss recovered,
        and the probing accuracies."""
        out = dict(self.metrics)
        if self.tokens is not None:
            out.update(self.tokens.figures())
        if self.ce is not None:
            out.update(self.ce.figures())
        out.update(probing_figures(self.probes))
        return out

    def state(self) -> dict[str, Any]:
        """Tensors and plain values only, which ``torch.load(..., weights_only=True)`` reads back
        (:meth:`from_state`)."""
        return {"metrics": self.metrics, "tokens": None if self.tokens is None else {
                    "clean": asdict(self.tokens.clean), "every": asdict(self.tokens.every),
                    "outlier_norm": self.tokens.outlier_norm},
                "ce": None if self.ce is None else asdict(self.ce),
                "probes": [[*key, tally] for key, tally in self.probes.items()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Evaluation:
        tokens = state["tokens"]
        return cls(state["metrics"],
                   None if tokens is None else TokenSums(ContextSums(**tokens["clean"]), ContextSums(**tokens["every"]),
                                                         tokens["outlier_norm"]),
                   None if state["ce"] is None else CELosses(**state["ce"]),
                   {Probe(task, probe): tally for task, probe, tally in state["probes"]})


def paired_gain_se(source: Evaluation, mix: list[tuple[Evaluation, float]],
                   statistic: Callable[[Evaluation, Tensor], Tensor], n_units: int) -> float:
    """Standard error of a candidate's gain ``sum_i t_i statistic(candidate_i) - statistic(source)`` (the candidate
    read off its points ``mix`` = ``[(evaluation, t_i), ...]``) by bootstrap over the ``n_units`` units (contexts,
    documents) both were measured on: the same resamples for both, so what the units share cancels.
    ``statistic(evaluation, weights)``: the figure under unit weights ``(..., n_units)``."""

    def gain(weights: Tensor) -> Tensor:
        return sum(t * statistic(e, weights) for e, t in mix) - statistic(source, weights)

    return bootstrap_se(gain, n_units)
