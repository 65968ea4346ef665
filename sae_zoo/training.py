"""Training aids: the pieces of a training method that are not the model's own computation.

A :class:`~sae_zoo.SparseCoder` computes codes, a reconstruction and a loss. How a run trains it beside that (a
dead-latent policy, a learning-rate schedule, a start from the data) is a list of training aids,
``model.aids``, each one object with its options. The model calls every aid's hooks, in order, at fixed
points of a run:

================  ===================================================================================
hook              when
================  ===================================================================================
``setup``         once, when the aid joins its model (size buffers to its latents)
``start``         a fresh run, before its first step, with training rows when ``reads_rows``
``before_batch``  before each training step, with the batch's inputs
``loss_terms``    in each training step: named terms, each with the weight it enters the loss at
``schedule``      once, for the optimiser: a learning-rate schedule (at most one aid gives one)
``finish``        at the end of a run, with training rows when ``reads_rows``
================  ===================================================================================

A new training method is a registered subclass and its test, with no edit to ``SparseCoder``::

    @register_training_aid("my_aid")
    class MyAid(TrainingAid):
        def __init__(self, coeff: float = 0.1) -> None: ...
        def loss_terms(self, model, x, codes, x_hat): return {"my_term": LossTerm(term, self.coeff)}

A recipe names it under ``model.aids`` (``[{name: my_aid, coeff: 0.2}]``, checked like every other key), and
``SparseCoder(..., aids=[MyAid(0.2)])`` takes it in code. The field's aids (AuxK and resampling in
:mod:`sae_zoo.dead_latents`, :class:`LRSchedule`, :class:`DecoderBiasInit`) are also registered, and are set by
``SparseCoder``'s flat options (``auxk_coeff``, ``lr_decay_steps``, ...), the names that saved configurations
and recipes use. The sparsity coefficient, which the loss itself reads, is :mod:`sae_zoo.sparsity`'s.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ._registry import Registry
from .objectives import geometric_median, lr_factor
from .schedules import schedule_steps, steps_or_fraction

#: what the hooks receive as ``model``: the :class:`~sae_zoo.SparseCoder` (a layer above this module, so not
#: imported here)
SparseCoder = nn.Module



class LossTerm(NamedTuple):
    """A term an aid adds to the loss: ``value`` (logged as it is) enters the loss as ``weight * value``."""

    value: Tensor
    weight: float | Tensor


class TrainingAid(nn.Module):
    """One piece of a training method, with hooks that :class:`~sae_zoo.SparseCoder` calls (the module's
    docstring lists them). Every hook does nothing by default. An aid's state is training state, never a weight of
    the model: its buffers (persistent ones) and what :meth:`save_state` writes go into a Lightning checkpoint
    under ``checkpoint["training_aids"][name]``, and stay out of ``model.safetensors``; ``config()`` rebuilds the
    aid."""

    #: the registry name (set by :func:`register_training_aid`)
    name: ClassVar[str] = ""
    #: whether the aid needs its model's own trainer and optimiser, so that a HeadBank cannot train it
    solo: ClassVar[bool] = False

    @property
    def reads_rows(self) -> bool:
        """Whether :meth:`start` and :meth:`finish` read training rows (the model draws them once for all)."""
        return False

    @property
    def active(self) -> bool:
        """Whether the aid does anything with its options (an aid built from options left off does not)."""
        return True

    def config(self) -> dict[str, Any]:
        """The aid's registry name and options: ``create_training_aid(**aid.config())`` rebuilds it."""
        raise NotImplementedError(f"training aid {type(self).__name__} must define config()")

    def setup(self, model: SparseCoder) -> None:
        """Once, when the aid joins ``model``."""

    def start(self, model: SparseCoder, rows: Tensor | None) -> None:
        """Before the first step of a fresh (not resumed) run; ``rows`` are training inputs when ``reads_rows``."""

    def before_batch(self, model: SparseCoder, x: Tensor) -> None:
        """Before each training step, on the batch's inputs ``x``."""

    def loss_terms(self, model: SparseCoder, x: Tensor, codes: Any, x_hat: Tensor,
                   target: Tensor | None = None) -> dict[str, LossTerm]:
        """Terms added to one training batch's loss, by name; ``codes`` are the head's training codes (a tensor or
        :class:`~sae_zoo.encoders.SparseCodes`) and ``x_hat`` their reconstruction of the target: ``x`` itself
        for an SAE (``target`` None), ``target`` for a transcoder (an aid that omits the argument is refused
        by one)."""
        return {}

    def log_values(self) -> dict[str, Tensor]:
        """Values logged under ``train/`` beside the losses, at the steps that log."""
        return {}

    def schedule(self, optimizer: torch.optim.Optimizer,
                 total_steps: float) -> torch.optim.lr_scheduler.LRScheduler | None:
        """A per-step learning-rate schedule for the model's ``optimizer`` over ``total_steps``, or None."""
        return None

    def finish(self, model: SparseCoder, rows: Tensor | None) -> None:
        """At the end of a run; ``rows`` are training inputs when ``reads_rows``."""

    def save_state(self, state: dict[str, Any]) -> None:
        """Write what a resumed run needs beside the aid's buffers into ``state`` (the aid's own part of the
        checkpoint)."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Read back what :meth:`save_state` wrote (an older checkpoint may lack it)."""


#: the registered training aids, by name
TRAINING_AIDS = Registry("training aid", TrainingAid)


def gives_schedule(aid: TrainingAid) -> bool:
    """Whether ``aid`` defines :meth:`TrainingAid.schedule` (a model takes its learning-rate schedule from one aid)."""
    return type(aid).schedule is not TrainingAid.schedule


def register_training_aid(name: str):
    """Class decorator: register a :class:`TrainingAid` under ``name`` (a recipe's ``model.aids[].name``)."""
    return TRAINING_AIDS.register(name, "register_training_aid")


def list_training_aids() -> list[str]:
    return TRAINING_AIDS.names()


def get_training_aid_class(name: str) -> type[TrainingAid]:
    return TRAINING_AIDS.get_class(name)


def create_training_aid(name: str, **options: Any) -> TrainingAid:
    """The registered aid ``name`` with ``options``."""
    return get_training_aid_class(name)(**options)


@register_training_aid("lr_schedule")
class LRSchedule(TrainingAid):
    """Linear learning-rate warm-up from 0 over ``warmup_steps``, then constant, then linear decay to 0 over
    the last ``decay_steps``, as SAELens and dictionary_learning do. Each is a number of steps, or a fraction of
    the run (0.1: its first 10%; 0.2: its last 20%). ``SparseCoder``'s ``lr_warmup_steps`` and
    ``lr_decay_steps`` set it."""

    def __init__(self, warmup_steps: int | float = 0, decay_steps: int | float = 0) -> None:
        super().__init__()
        self.warmup_steps = steps_or_fraction(warmup_steps, "lr_warmup_steps")
        self.decay_steps = steps_or_fraction(decay_steps, "lr_decay_steps")

    @property
    def active(self) -> bool:
        return bool(self.warmup_steps or self.decay_steps)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}

    def schedule(self, optimizer: torch.optim.Optimizer,
                 total_steps: float) -> torch.optim.lr_scheduler.LRScheduler | None:
        if not self.active:
            return None
        known = 0 < total_steps < float("inf")
        if self.decay_steps and not known:
            raise ValueError("lr_decay_steps needs a known number of training steps: set trainer.max_steps")
        warmup = schedule_steps(self.warmup_steps, total_steps, "lr_warmup_steps")
        decay = schedule_steps(self.decay_steps, total_steps, "lr_decay_steps")
        total = int(total_steps) if known else 0
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, decay))


@register_training_aid("decoder_bias_init")
class DecoderBiasInit(TrainingAid):
    """A fresh run's decoder bias set from training rows: their ``mean`` or their ``geometric_median``
    (robust to outlier inputs). ``SparseCoder``'s ``decoder_bias_init`` sets it; ``bias_init_samples`` rows."""

    def __init__(self, how: Literal["mean", "geometric_median"] | None = None) -> None:
        super().__init__()
        if how not in (None, "mean", "geometric_median"):
            raise ValueError(f"decoder_bias_init must be 'mean', 'geometric_median' or None, got {how!r}")
        self.how = how

    @property
    def active(self) -> bool:
        return self.how is not None

    @property
    def reads_rows(self) -> bool:
        return self.active

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "how": self.how}

    def setup(self, model: SparseCoder) -> None:
        if self.active and model.dictionary.bias is None:
            raise ValueError(f"decoder_bias_init={self.how!r} needs a dictionary with a bias (bias=True)")

    @torch.no_grad()
    def start(self, model: SparseCoder, rows: Tensor | None) -> None:
        if self.active:
            model.dictionary.bias.copy_(rows.mean(0) if self.how == "mean" else geometric_median(rows))
