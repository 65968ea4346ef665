"""Several models trained from one stream of activations: each batch is read once and every model learns from it.

Training candidate heads one by one reads (or computes) the activations once per head; a
:class:`HeadBank` reads them once for all (``benchmarks/multihead.py`` measures the difference). The models may
read the same activations (candidate heads on one decoder) or each its own part of every batch (one model per hook
of a language model, all read in one forward pass: ``reads``).

Each model keeps its whole training method: its own Adam (learned atom norms at their own rate) and learning-rate
schedule, its sparsity coefficient (tuned towards its own ``target_l0``), its aids (AuxK, dead-latent resampling,
which clears its own optimiser's state, a decoder-bias start), its Matryoshka prefixes. One backward pass over the
sum of the losses gives each model the gradient of its own loss (they share no trained parameter), and each
optimiser then steps, so every model takes exactly the steps it would take alone on the same batches.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .data.base import Batch, unpack_batch
from .model import SparseCoder, logging_step, training_batches, training_progress, training_sample


class HeadBank(L.LightningModule):
    """Train ``models`` (name -> :class:`SparseCoder`) side by side with one ``Trainer.fit``: every training batch
    goes to each of them, whole, or, with ``reads`` (name -> key), its part ``batch[key]`` of a mapping batch. The
    models may share a frozen dictionary, not a trained parameter. Logs what each model logs alone, under
    ``train/NAME/`` (``train/NAME/loss``, ``train/NAME/l0``, ...)."""

    def __init__(self, models: dict[str, SparseCoder], reads: dict[str, str] | None = None) -> None:
        super().__init__()
        if not models:
            raise ValueError("HeadBank needs at least one model")
        if reads is not None and set(reads) != set(models):
            raise ValueError(f"HeadBank: reads names {sorted(reads)}, the models are {sorted(models)}")
        owners: dict[int, str] = {}
        for name, model in models.items():
            solo = [f"the {aid.name!r} aid" for aid in model.aids if aid.active and aid.solo]
            if solo:
                raise ValueError(f"HeadBank: model {name!r} sets {', '.join(solo)}, which needs its own trainer; "
                                 "train it alone with Trainer.fit(model)")
            for parameter in model.parameters():
                if parameter.requires_grad and owners.setdefault(id(parameter), name) != name:
                    raise ValueError(f"HeadBank: models {owners[id(parameter)]!r} and {name!r} share a trained "
                                     "parameter; share a frozen dictionary only")
        self.names, self.reads = list(models), reads
        self.models = nn.ModuleList(models.values())
        self.automatic_optimization = False  # each model's optimiser and schedule step here

    def part(self, batch: Batch | dict[str, Batch], index: int) -> Batch:
        """The part of a training batch model ``index`` reads."""
        return batch if self.reads is None else batch[self.reads[self.names[index]]]

    def setup(self, stage: str) -> None:
        for model in self.models:  # each model reads its step, its run's length and its optimiser through it
            model.trainer = self.trainer

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        logging = logging_step(self.trainer)
        optimizers, schedules = self._optimizers_and_schedules()
        total = 0.0
        for i, (name, model) in enumerate(zip(self.names, self.models)):
            losses = model.step_losses(self.part(batch, i), logging, name)
            if logging:
                self.log_dict({f"train/{name}/{k}": v for k, v in model.step_log(losses).items()})
            total = total + losses["loss"]
        self.manual_backward(total)
        # the wrapped first optimiser counts the trainer's step (once per batch); the rest step as they are
        for i, (optimizer, schedule) in enumerate(zip(optimizers, schedules)):
            optimizer.step() if i == 0 else optimizer.optimizer.step()
            optimizer.zero_grad()
            if schedule is not None:
                schedule.step()

    def _optimizers_and_schedules(self) -> tuple[list[Any], list[Any]]:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedules = [self._schedules.get(i) for i in range(len(optimizers))]
        return optimizers, schedules

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        progress = training_progress(self.trainer)
        for i, model in enumerate(self.models):
            model.before_training_batch(unpack_batch(self.part(batch, i))[0], progress)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        for i, model in enumerate(self.models):
            model.on_train_batch_end(outputs, self.part(batch, i), batch_idx)

    def on_train_start(self) -> None:
        self._each_on_training_rows("start_training")

    def on_train_end(self) -> None:
        self._each_on_training_rows("finish_training")
        for model in self.models:
            model.trainer = None

    def _each_on_training_rows(self, method: str) -> None:
        """Every model starts and ends its run (``SparseCoder.start_training`` and ``finish_training``), on its
        training rows where it reads them (a ``target_l0``, an aid); one read of the data serves them all."""
        if method == "start_training" and self.global_step:
            return
        why = {i: reason for i, m in enumerate(self.models) if (reason := m.reads_training_rows()) is not None}
        rows: dict[int, Tensor] = {}
        if why:  # one read of the data serves every model: each takes its part of the same batches
            wanted = max(self.models[i].training_config.bias_init_samples for i in why)
            batches = training_batches(self.trainer, wanted, next(iter(why.values())))
            for i in why:
                rows[i] = training_sample(self.trainer, self.models[i].dictionary.d_model, wanted, why[i], batches,
                                          part=lambda batch, i=i: self.part(batch, i))
        for i, model in enumerate(self.models):
            getattr(model, method)(rows[i][:model.training_config.bias_init_samples] if i in why else None)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        """Each model's own optimiser and learning-rate schedule (:meth:`SparseCoder.configure_optimizers`)."""
        optimizers, schedules, self._schedules = [], [], {}
        for model in self.models:
            if not any(p.requires_grad for p in model.parameters()):
                raise ValueError("HeadBank: a model has nothing to train (its head and dictionary are frozen)")
            chosen = model.configure_optimizers()
            if isinstance(chosen, dict):
                self._schedules[len(optimizers)] = chosen["lr_scheduler"]["scheduler"]
                chosen = chosen["optimizer"]
            model.bank_optimizer = chosen
            optimizers.append(chosen)
        return optimizers, schedules

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Each model's training state beside the weights (sparsity controller, aids), under its name."""
        for name, model in zip(self.names, self.models):
            own: dict[str, Any] = {}
            model.on_save_checkpoint(own)
            checkpoint[f"model:{name}"] = own
        checkpoint["lr_schedules"] = {i: s.state_dict() for i, s in self._schedules.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, model in zip(self.names, self.models):
            model.on_load_checkpoint(checkpoint[f"model:{name}"])
        self._saved_schedules = checkpoint.get("lr_schedules", {})

    def on_fit_start(self) -> None:
        for i, state in getattr(self, "_saved_schedules", {}).items():
            self._schedules[int(i)].load_state_dict(state)

