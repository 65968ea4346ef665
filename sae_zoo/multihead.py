"""Several models trained from one stream of activations: each batch is read once and every model learns from it.

Training candidate heads one by one reads (or computes) the activations once per head; a
:class:`HeadBank` reads them once for all (``benchmarks/multihead.py`` measures the difference). Each
model keeps its own loss, sparsity coefficient (tuned towards its own ``target_l0``), learning rate and
dead-latent counts. Adam works per parameter and the losses share no parameter, so each model takes
exactly the steps it would take alone on the same batches.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .data.base import Batch
from .model import BUILTIN_AIDS, SparseCoder, training_progress, training_sample, unpack_batch
from .objectives import adam

#: SparseCoder's options that a bank does not reproduce (they need a model's own trainer): train such a model
#: alone. A further training aid says so itself (``TrainingAid.solo``).
SOLO_OPTIONS = ("resample_every", "lr_warmup_steps", "lr_decay_steps", "sparsity_warmup_steps", "decoder_bias_init")


class HeadBank(L.LightningModule):
    """Train ``models`` (name -> :class:`SparseCoder`; e.g. candidate heads on one frozen decoder) side by
    side with one ``Trainer.fit``: every training batch goes to each of them. The models may share a frozen
    dictionary, not a trained parameter. Logs ``train/NAME/loss`` and ``train/NAME/l0``."""

    def __init__(self, models: dict[str, SparseCoder]) -> None:
        super().__init__()
        if not models:
            raise ValueError("HeadBank needs at least one model")
        owners: dict[int, str] = {}
        for name, model in models.items():
            used = [k for k in SOLO_OPTIONS if model.training_options[k]]
            used += [f"the {aid.name!r} aid" for aid in model.aids
                     if aid.name not in BUILTIN_AIDS and aid.active and aid.solo]
            if used:
                raise ValueError(f"HeadBank: model {name!r} sets {', '.join(used)}, which needs its own trainer; "
                                 "train it alone with Trainer.fit(model)")
            for parameter in model.parameters():
                if parameter.requires_grad and owners.setdefault(id(parameter), name) != name:
                    raise ValueError(f"HeadBank: models {owners[id(parameter)]!r} and {name!r} share a trained "
                                     "parameter; share a frozen dictionary only")
        self.names = list(models)
        self.models = nn.ModuleList(models.values())

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        every = self.trainer.log_every_n_steps
        logging = every > 0 and (self.global_step + 1) % every == 0
        total = 0.0
        for name, model in zip(self.names, self.models):
            losses = model.tuned_losses(batch, measure_l0=logging)
            if logging:
                if not torch.isfinite(losses["loss"]):
                    raise FloatingPointError(f"model {name!r}: the training loss is {losses['loss'].item()} at step "
                                             f"{self.global_step}: lower its learning rate")
                self.log_dict({f"train/{name}/{k}": v for k, v in losses.items() if k in ("loss", "l0")})
            total = total + losses["loss"]
        return total

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        progress, x = training_progress(self.trainer), unpack_batch(batch)[0]
        for model in self.models:
            model.before_training_batch(x, progress)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        for model in self.models:
            model.on_train_batch_end(outputs, batch, batch_idx)

    def on_train_start(self) -> None:
        self._each_on_training_rows("start_training")

    def on_train_end(self) -> None:
        self._each_on_training_rows("finish_training")

    def _each_on_training_rows(self, method: str) -> None:
        """Every model starts and ends its run (``SparseCoder.start_training`` and ``finish_training``), on
        training rows where it reads them (a ``target_l0``, an aid); one read of the data serves them all."""
        if method == "start_training" and self.global_step:
            return
        why = {i: reason for i, m in enumerate(self.models) if (reason := m.reads_training_rows()) is not None}
        points = None
        if why:
            points = training_sample(self.trainer, self.models[0].dictionary.d_model,
                                     max(self.models[i].training_options["bias_init_samples"] for i in why),
                                     next(iter(why.values())))
        for i, model in enumerate(self.models):
            getattr(model, method)(points[:model.training_options["bias_init_samples"]] if i in why else None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam with a parameter group per model, at that model's learning rate."""
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": model.lr}
                  for model in self.models]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("HeadBank: nothing to train (every model is frozen)")
        return adam(groups)
