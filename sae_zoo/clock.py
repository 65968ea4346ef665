"""The seconds a run trains, measured over the span a peer's trainer measures, so that tokens per second compare."""

from __future__ import annotations

import time
import lightning as L


class TrainingClock(L.Callback):
    """Seconds of training in a ``Trainer.fit``: from the start of training (before the model's ``on_train_start``,
    which starts its aids on training rows) to the end of the fit (after its ``on_train_end``, which calibrates a
    target L0), less the validation loops run inside it. The sanity check runs before and is not counted. This is
    the span SAELens's ``SAETrainer.fit`` times: its steps with their data, its statistics of the first batches and
    its final folding, and no evaluation (its runs here log none)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None
        self._validation_start: float | None = None
        self._validating = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._validating = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and self._validation_start is not None:  # not the sanity check's
            self._validating += time.perf_counter() - self._validation_start
        self._validation_start = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start - self._validating
