"""The metrics every evaluation of a sparse coder reports, as one module: the model's validation and
test steps and :func:`sae_zoo.evaluation.evaluate` all update it the same way."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanSquaredError, Metric

from .code_recovery import MCC, DictionaryMCC
from .detection import FeatureUniqueness, LatentDetection, Shrinkage
from .reconstruction import FractionOfVarianceUnexplained
from .sparsity import L0, L1, DeadLatents


class SparseCodingMetrics(nn.Module):
    """FVU, MSE, L0, L1 and the dead fraction; MCC when true codes are given (``code_recovery``; its
    ``n_latents x n_true`` state is skipped for data without them, or where it costs too much);
    dictionary MCC (over the matched pairs, as SynthSAEBench scores it), feature uniqueness and
    shrinkage when true atoms are, and with true codes too the latents as feature detectors
    (precision, recall, F1 and accuracy: ``latent_f1`` and the others)."""

    #: metrics updated from the dictionary alone, once per evaluation
    DICTIONARY_METRICS = ("dictionary_mcc", "uniqueness")

    def __init__(self, d_model: int, n_latents: int, *, num_true_latents: int | None = None,
                 code_recovery: bool = True, dictionary_recovery: bool = False, sync_on_compute: bool = True) -> None:
        super().__init__()
        sync = {"sync_on_compute": sync_on_compute}  # False: one process computes on what it saw alone
        metrics: dict[str, Metric] = {"fvu": FractionOfVarianceUnexplained(d_model, **sync),
                                      "mse": MeanSquaredError(**sync), "l0": L0(**sync), "l1": L1(**sync),
                                      "dead_latents": DeadLatents(n_latents, **sync)}
        if code_recovery:
            metrics["mcc"] = MCC(n_latents, num_true_latents or n_latents, **sync)
        if dictionary_recovery:
            metrics["dictionary_mcc"] = DictionaryMCC(n_latents, num_true_latents or n_latents, over="matches", **sync)
            metrics["uniqueness"] = FeatureUniqueness(**sync)
            metrics["shrinkage"] = Shrinkage(**sync)
            metrics["latent_detection"] = LatentDetection(n_latents, **sync)
        self.metrics = nn.ModuleDict(metrics)

    def update(self, x_hat: Tensor, x: Tensor, codes: Tensor, true_codes: Tensor | None = None,
               atoms: Tensor | None = None, true_atoms: Tensor | None = None) -> None:
        """One batch; ``atoms`` and ``true_atoms`` (the dictionary's and the true ones) let the latents be
        scored as feature detectors."""
        self.metrics["fvu"].update(x_hat, x)
        self.metrics["mse"].update(x_hat, x)
        for name in ("l0", "l1", "dead_latents"):
            self.metrics[name].update(codes)
        if "shrinkage" in self.metrics:
            self.metrics["shrinkage"].update(x_hat, x)
        if true_codes is not None and "mcc" in self.metrics:
            self.metrics["mcc"].update(codes, true_codes)
        scores_detection = atoms is not None and true_atoms is not None and "latent_detection" in self.metrics
        if true_codes is not None and scores_detection:
            self.metrics["latent_detection"].update(codes, true_codes, atoms, true_atoms)

    def update_dictionary(self, atoms: Tensor, true_atoms: Tensor) -> None:
        for name in self.DICTIONARY_METRICS:
            self.metrics[name].update(atoms, true_atoms)

    def updated(self) -> dict[str, Metric]:
        """The metrics that have seen data since the last reset."""
        return {name: metric for name, metric in self.metrics.items() if metric.update_count > 0}

    def compute(self) -> dict[str, float]:
        """Every updated metric's value; the detection metrics as ``latent_precision``, ``latent_recall``,
        ``latent_f1`` and ``latent_accuracy``."""
        out: dict[str, float] = {}
        for name, metric in self.updated().items():
            value = metric.compute()
            if isinstance(value, dict):
                out.update({f"latent_{key}": float(v) for key, v in value.items()})
            else:
                out[name] = float(value)
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
