"""Runs that resume: a checkpoint written every N steps into the run folder, atomically, holding all that training
needs to go on as if it had never stopped (the model, the optimiser and its schedule, the training aids, the sparsity
controller, and the data position: the datamodule's ``state_dict``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L

#: the checkpoint a resumable run keeps in its folder (replaced at every save)
CHECKPOINT = "checkpoint.ckpt"


class PeriodicCheckpoint(L.Callback):
    """Save ``folder/checkpoint.ckpt`` after every ``every`` training steps: written beside it, then renamed over it,
    so that a kill at any moment leaves the last whole checkpoint. It is saved as the next batch starts, once the
    model has finished its step (a trained dictionary renormalises its atoms at the step's end, after the callbacks'
    ``on_train_batch_end``). Saving is collective (rank zero writes)."""

    def __init__(self, folder: str | Path, every: int) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of steps, got {every!r}")
        self.folder, self.every = Path(folder), every

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == getattr(self, "_saved_at", None):
            return
        self._saved_at = step
        partial = self.folder / f".{CHECKPOINT}.partial"
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.folder / CHECKPOINT)
        trainer.strategy.barrier("checkpoint")
