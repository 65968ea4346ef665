"""``SparseCoder``: the LightningModule that pairs one encoder head with one dictionary."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from torch import Tensor

from ._io import atomic_directory, atomic_write_json, read_safetensors
from ._modes import evaluating
from .distributed import gathered_rows
from .data.base import Batch, unpack_batch
from .dictionary import Dictionary
from .encoders import EncoderHead, SparseCodes, create_encoder
from .families import ModelFamily, family_from_options
from .metrics import Scoring, SparseCodingMetrics
from .model_config import ModelConfig
from .dead_latents import DeadLatents
from .objectives import adam
from .pretrained import model_card
from .pretrained.config import (CONFIG_NAME, WEIGHTS_NAME, build_dictionary, build_encoder, load_state, model_config,
                                read_model_config, save_weights)
from .pretrained.files import resolve_file
from .sparsity import SparsityControl, calibrate_l0, start_at_l0
from .training import DecoderBiasInit, LossTerm, LRSchedule, TrainingAid, create_training_aid, gives_schedule
from .training_config import FIELDS as TRAINING_FIELDS
from .training_config import TrainingConfig


class Reconstruction(NamedTuple):
    """What :class:`SparseCoder` returns: the reconstruction and the codes it decodes from."""

    x_hat: Tensor
    codes: Tensor


def latent_cosine_loss(codes: Tensor, true_codes: Tensor) -> Tensor:
    """The paper's supervised (known-codes) loss: minus the mean over latents of the cosine
    similarity between each inferred latent and its true latent, across the batch."""
    return -F.cosine_similarity(codes.T, true_codes.T, dim=-1).mean()


@torch.no_grad()
def tie_encoder_to_decoder(encoder: EncoderHead, dictionary: Dictionary) -> None:
    """Start the encoder's linear map as the decoder's transpose, with zero bias (Gao et al. 2024;
    dictionary_learning does the same): every latent starts out reading its own atom, so few start dead."""
    linear = getattr(encoder, "linear", None) or getattr(encoder.trained_part(), "linear", None)  # or a warm start's
    if not isinstance(linear, torch.nn.Linear) or tuple(linear.weight.shape) != tuple(dictionary.weight.shape):
        raise ValueError(f"tied_init needs a head built on one linear map of shape (n_latents, d_model); the "
                         f"{encoder.name!r} head has none")
    linear.weight.copy_(dictionary.weight)
    if linear.bias is not None:
        linear.bias.zero_()


def l1_penalty(codes: Tensor | SparseCodes, dictionary: Dictionary, nonnegative: bool = False) -> Tensor:
    """The mean ``|code|`` over all (samples x n_latents) codes, each weighed by its atom's norm when the
    dictionary has norms (SAELens's standard SAE, Anthropic's April 2024 recipe): the L1 of the codes of
    unit atoms, which a latent cannot lower by growing its atom. ``nonnegative`` (dense ReLU codes) skips
    the ``abs``."""
    sparse = isinstance(codes, SparseCodes)
    values = codes.values if sparse else codes
    magnitudes = values if nonnegative and not sparse else values.abs()
    norms = dictionary.atom_norms
    if norms is not None:
        magnitudes = magnitudes * (norms[codes.indices] if sparse else norms)
    return magnitudes.sum() / (values[..., 0].numel() * dictionary.n_latents)


def total_loss(terms: Iterable[LossTerm]) -> Tensor:
    """The sum of each term's ``weight * value``, in order (a weight of 1 adds the value as it is)."""
    loss = None
    for term in terms:
        weighted = term.value if isinstance(term.weight, float) and term.weight == 1.0 else term.weight * term.value
        loss = weighted if loss is None else loss + weighted
    return loss


def training_batches(trainer: L.Trainer, wanted: int, why: str) -> list[Batch]:
    """The first training batches, enough for ``wanted`` rows (of each part of a mapping batch: one model's part of
    a batch read at several hooks); ``why`` names what reads them, for the error when there are none."""
    # a datamodule's sample comes from a loader of its own, so that the trainer's keeps its pass and place
    sample = getattr(getattr(trainer, "datamodule", None), "sample_batches", None)
    loader = sample() if sample is not None else trainer.train_dataloader  # set once fitting has started
    if loader is None:
        raise ValueError(f"{why} reads training data, and the trainer has none")
    batches, rows = [], 0
    # a shuffling loader draws its order from the global generator: read apart from it, the training's shuffle is
    # the one a run that reads no sample gets
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            batches.append(batch)
            rows += len(unpack_batch(next(iter(batch.values())) if isinstance(batch, dict) else batch)[0])
            if rows >= wanted:
                break
    if not batches:
        raise ValueError(f"{why}: the training data is empty")
    return batches


def training_sample(trainer: L.Trainer, d_model: int, wanted: int, why: str, batches: list[Batch] | None = None,
                    part: Callable[[Any], Batch] | None = None) -> Tensor:
    """Up to ``wanted`` rows of the trainer's training data (of ``batches``, or the first ones; ``part`` of each),
    rank zero's on every rank (a start from them must be the same everywhere); ``why`` names what reads them."""
    batches = training_batches(trainer, wanted, why) if batches is None else batches
    samples = [unpack_batch(part(batch) if part else batch)[0].reshape(-1, d_model).float() for batch in batches]
    return trainer.strategy.broadcast(torch.cat(samples)[:wanted].to(trainer.strategy.root_device), src=0)


def logging_step(trainer: L.Trainer) -> bool:
    """Whether the trainer writes logs after this step. Logging costs more than a small model's whole step, so
    training metrics are only computed for the steps that are written."""
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step + 1) % every == 0


def training_progress(trainer: L.Trainer) -> float | None:
    """The run's progress: steps done over all its steps (None where its length is unknown)."""
    total = trainer.estimated_stepping_batches
    return trainer.global_step / total if 0 < total < float("inf") else None


class SparseCoder(ModelHubMixin, L.LightningModule, library_name="sae_zoo", license="apache-2.0",
                  tags=["sparse-autoencoder", "sparse-coding", "interpretability"],
                  paper_url="https://arxiv.org/abs/2411.13117"):
    """One encoder head in front of one dictionary, trained with the paper's loss and Adam.

    The paper's three settings follow from two choices:

    * **known dictionary**: a frozen :class:`Dictionary` (``trainable=False``) holding the true atoms;
      only the encoder trains.
    * **unknown codes and dictionary**: a trainable dictionary, renormalised to unit-norm atoms after
      every optimiser step.
    * **known codes**: ``supervised=True``; the encoder is trained to match the batch's true codes
      (``(x, true_codes)`` batches) with a per-latent cosine loss.

    The model holds structure: the head, the dictionary, and its **family** (:mod:`sae_zoo.families`: ``"sae"``,
    which reconstructs its input, by default; ``"transcoder"``, which writes a target from an input, with
    ``{"name": "transcoder", "skip_connection": True}`` for a skip term; the flat ``transcoder=True``,
    ``skip_connection``, ``train_skip`` that saved models and recipes write are read into it). How it trains is one
    :class:`~sae_zoo.TrainingConfig` (``training``: the object or a dict of its options), or the same options
    written flat (``SparseCoder(head, dictionary, lr=3e-3, target_l0=8)``, as recipes and saved checkpoints
    write them), read into that object once (``model.training_config``). ``model.config()`` is all of it, as saved.

    What validation and tests score it against is its **scoring** (:class:`~sae_zoo.metrics.Scoring`, which a
    recipe builds from what its data know; ``model.score_with(...)``): FVU, MSE, L0, L1 and the dead fraction
    always; MCC where the batch carries true codes (unless ``code_recovery=False``, which drops its ``n_latents``
    x ``n_true`` state); dictionary MCC where it holds a ``true_dictionary``. ``code_recovery=`` and
    ``true_dictionary=`` are read into it too.

    The loss is ``MSE + coeff * sparsity`` (element means) plus the training aids' terms, where the sparsity
    penalty is the head's own (:meth:`EncoderHead.training_codes`: the L1 of the codes unless the head has
    another, as JumpReLU's L0). The training options, by what they set:

    * **the objective**: ``matryoshka_widths`` (every prefix of the latents reconstructs on its own, the losses
      summed);
    * **the sparsity coefficient** (``model.sparsity``, :mod:`sae_zoo.sparsity`): ``l1_coeff`` to start,
      ``sparsity_warmup_steps``, and ``target_l0``/``target_l0_rate`` (``coeff`` tuned until the batches' L0
      averages the target, the run started and ended on it);
    * **the start**: ``tied_init`` (the encoder starts as the decoder's transpose), and ``bias_init_samples``
      training rows for what starts from the data;
    * **training aids** (``model.aids``, :mod:`sae_zoo.training`; each one object with its hooks): the field's,
      set by flat options that saved configurations keep, ``auxk_coeff``/``auxk_k``/``dead_tokens``/
      ``resample_every`` (AuxK on the latents that have not fired for ``dead_tokens`` tokens, and Anthropic's
      resampling: ``model.dead_latents``), ``lr_warmup_steps``/``lr_decay_steps`` (a number of steps, or a
      fraction of the run, e.g. 0.1: the first 10%, 0.2: the last 20%) and ``decoder_bias_init`` (the data's ``mean`` or
      ``geometric_median``); and any further :class:`~sae_zoo.training.TrainingAid` in ``aids`` (objects, or
      ``{"name": ..., **options}`` dicts of registered ones), which is how a new training method joins
      without a new option here.

    ``encoder`` and ``dictionary`` may also be given as their ``config()`` dicts, which is how
    ``SparseCoder.load_from_checkpoint`` rebuilds them.

    ``save_pretrained(dir)``, ``push_to_hub(repo_id)`` and ``SparseCoder.from_pretrained(repo_or_dir,
    revision=...)`` (Hugging Face's ``ModelHubMixin``) store ``config.json``, ``model.safetensors`` and a
    model card ``README.md``, written and read by :mod:`sae_zoo.pretrained`; pushing to a branch, other
    libraries' formats and run directories are in :mod:`sae_zoo.hub`.
    """

    def __init__(self, encoder: EncoderHead | dict[str, Any], dictionary: Dictionary | dict[str, Any],
                 training: TrainingConfig | dict[str, Any] | None = None, *,
                 family: str | dict[str, Any] | ModelFamily | None = None, scoring: Scoring | None = None,
                 **options: Any) -> None:
        super().__init__()
        # the keys recipes and saved models have always written, read once into the family, the scoring and the
        # training config
        family = family_from_options(family, **{k: options.pop(k) for k in LEGACY_FAMILY_KEYS if k in options})
        legacy_scoring = {k: options.pop(k) for k in ("code_recovery", "true_dictionary") if k in options}
        if scoring is not None and legacy_scoring:
            raise TypeError(f"SparseCoder got scoring and {', '.join(legacy_scoring)}; give the scoring alone")
        scoring = scoring if scoring is not None else Scoring(**legacy_scoring)
        t = self.training_config = TrainingConfig.of(training, options)
        encoder = create_encoder(**encoder) if isinstance(encoder, dict) else encoder
        dictionary = Dictionary(**dictionary) if isinstance(dictionary, dict) else dictionary
        if encoder.n_latents != dictionary.n_latents:
            raise ValueError(f"encoder {encoder.name!r} maps {encoder.d_model} -> {encoder.n_latents} latents, but the "
                             f"dictionary has shape (n_latents={dictionary.n_latents}, d_model={dictionary.d_model})")
        family.check(encoder, dictionary, t, scoring)
        if t.target_l0 is not None and encoder.forced_l0 is not None:
            raise ValueError(f"target_l0={t.target_l0} tunes the sparsity penalty, but the {encoder.name!r} head keeps "
                             f"k={encoder.forced_l0} codes per sample whatever the penalty; set its k instead, and "
                             "drop target_l0")
        if encoder.subtract_decoder_bias and dictionary.bias is None:
            raise ValueError(f"encoder {encoder.name!r} subtracts the decoder bias (subtract_decoder_bias=True), "
                             "but the dictionary has none; build it with bias=True")
        self.encoder, self.dictionary, self.family = encoder, dictionary, family
        #: the family's linear term of the raw input added to the output (a skip-transcoder's), or None
        self.skip = family.skip_term(encoder, dictionary)
        if t.tied_init:
            tie_encoder_to_decoder(encoder, dictionary)
        #: the loss's reconstruction term (:mod:`sae_zoo.reconstruction`)
        self.reconstruction = t.reconstruction_term()
        self.reconstruction.setup(dictionary.n_latents)
        if t.matryoshka_widths is not None:  # the flat spelling of the matryoshka term, saved as checked there
            t.matryoshka_widths = self.reconstruction.widths
        self.sparsity = SparsityControl(self.l1_coeff, t.target_l0, t.target_l0_rate, t.sparsity_warmup_steps)
        #: after a run that targets an L0: the L0 the controller reached and the threshold shift that ends on it
        self.l0_calibration: dict[str, float] | None = None
        self.aids = self._build_aids(t)
        #: the optimiser a HeadBank trains this model with (None: its own trainer's)
        self.bank_optimizer: torch.optim.Optimizer | None = None
        self.save_hyperparameters(self.config().to_dict())
        #: what evaluation scores the model against (:class:`~sae_zoo.metrics.Scoring`; :meth:`score_with`)
        self.score_with(scoring)

    def _build_aids(self, t: TrainingConfig) -> list[TrainingAid]:
        """Every training aid, the field's (from the training config's options) first, in the order their hooks
        run. Aids are not submodules: their state is training state, saved in checkpoints under their names
        (:meth:`on_save_checkpoint`), never in ``model.safetensors``; they move with the model (:meth:`_apply`)."""
        extra = [create_training_aid(**aid) if isinstance(aid, dict) else aid for aid in t.aids]
        for aid in extra:
            if not isinstance(aid, TrainingAid):
                raise TypeError(f"aids takes TrainingAid objects or {{'name': ..., **options}} dicts, got {aid!r}")
        t.aids = tuple(extra)
        aids = [DecoderBiasInit(t.decoder_bias_init),
                DeadLatents(t.auxk_coeff, t.auxk_k, t.dead_tokens, t.resample_every),
                LRSchedule(t.lr_warmup_steps, t.lr_decay_steps), *extra]
        names = [aid.name for aid in aids]
        if len(set(names)) < len(names):
            raise ValueError(f"aids: each aid may be given once (its state is saved under its name), got "
                             f"{[aid.name for aid in extra]}")
        for aid in aids:
            if self.family.paired and aid.active and "target" not in inspect.signature(aid.loss_terms).parameters:
                raise ValueError(f"aids: {aid.name!r} has no target argument in loss_terms, so it would treat a "
                                 f"{self.family.name}'s input as its target; give it loss_terms(..., target=None)")
            aid.setup(self)
        schedules = [aid.name for aid in aids if aid.active and gives_schedule(aid)]
        if len(schedules) > 1:
            raise ValueError(f"aids: {', '.join(schedules)} each set the learning-rate schedule; keep one")
        return aids

    def config(self) -> ModelConfig:
        """Everything that rebuilds this model (:class:`~sae_zoo.model_config.ModelConfig`): what
        ``save_pretrained``, checkpoints and the model card read."""
        return ModelConfig(self.encoder.config(), self.dictionary.config(), self.family, self.training_config)

    def score_with(self, scoring: Scoring) -> None:
        """Score validation and tests against ``scoring`` (fresh metrics)."""
        scoring.check(self.dictionary.d_model)
        self.scoring = scoring
        self.val_metrics, self.test_metrics = self.new_metrics(), self.new_metrics()

    @property
    def transcoder(self) -> bool:
        """Whether the model writes a target other than its input (its family pairs them: a transcoder's)."""
        return self.family.paired

    @property
    def true_dictionary(self) -> Tensor | None:
        return self.scoring.true_dictionary

    @property
    def code_recovery(self) -> bool:
        return self.scoring.code_recovery

    # the training options the model reads, as its training config holds them
    @property
    def l1_coeff(self) -> float:
        return float(self.training_config.l1_coeff)

    @property
    def lr(self) -> float:
        return float(self.training_config.lr)

    @property
    def supervised(self) -> bool:
        return bool(self.training_config.supervised)

    @property
    def sparse_decode(self) -> bool:
        return bool(self.training_config.sparse_decode)

    @property
    def dead_latents(self) -> DeadLatents:
        """The dead-latent aid (AuxK and resampling)."""
        return self.aids[1]

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "SparseCoder":
        """Moves and casts reach the training aids too (``.to``, ``.cuda``, ``.double``), which are no submodules."""
        super()._apply(fn, *args, **kwargs)
        for aid in getattr(self, "aids", ()):
            aid._apply(fn, *args, **kwargs)
        return self

    def new_metrics(self, sync_on_compute: bool = True) -> SparseCodingMetrics:
        """The metrics an evaluation of this model reports (fresh state), as its :attr:`scoring` says; see
        :meth:`update_metrics`. ``sync_on_compute=False``: computed by one process on what it saw, without the
        other ranks."""
        return self.scoring.new_metrics(self.dictionary.d_model, self.dictionary.n_latents, self.device,
                                        sync_on_compute=sync_on_compute)

    @property
    def setting(self) -> str:
        """The paper's name for what is known: ``known_codes``, ``known_dictionary`` or ``unknown``."""
        if self.supervised:
            return "known_codes"
        return "unknown" if self.dictionary.trainable else "known_dictionary"

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x, self.dictionary)

    def decode(self, codes: Tensor) -> Tensor:
        return self.dictionary.decode(codes)

    def forward(self, x: Tensor) -> Reconstruction:
        """``x -> Reconstruction(x_hat, codes)``; a transcoder's ``x_hat`` is its output, the target it predicts
        (with a skip connection, ``decode(codes) + x @ skip.weight.T``: SAELens's and sparsify's formula)."""
        codes = self.encode(x)
        x_hat = self.decode(codes)
        return Reconstruction(x_hat if self.skip is None else x_hat + self.skip(x), codes)

    def training_losses(self, batch: Batch, measure_l0: bool = True) -> dict[str, Tensor]:
        """The objective of one training batch: ``loss``; in the paper's unsupervised settings ``MSE +
        coeff * sparsity`` (both means over elements) and further terms. Its parts: ``mse`` (summed
        over the Matryoshka prefixes, if any), ``sparsity`` (the head's penalty: the L1 of the codes
        unless the head has its own), the head's ``aux`` term and ``auxk``, with the batch's ``l0`` (when
        ``measure_l0``: one more pass over the codes, which a step that neither logs nor targets an L0 skips). A head
        with a sparse form (top-k) is decoded from its k atoms per sample when ``sparse_decode``."""
        x, target, true_codes = self.checked_batch(batch)
        if self.supervised:
            if true_codes is None:
                raise ValueError("supervised (known-codes) training needs (x, true_codes) batches")
            return {"loss": latent_cosine_loss(self.encode(x), true_codes)}
        out = self.encoder.training_codes(x, self.dictionary, sparse=self.sparse_decode)
        codes = out.codes
        # a skip term moves to the target's side: every Matryoshka prefix's output gains it alike
        skipped = None if self.skip is None else self.skip(x)
        decoded_target = target if skipped is None else target - skipped
        mse, x_hat = self.reconstruction(self.dictionary, codes, decoded_target)
        if skipped is not None:
            x_hat = x_hat + skipped
        sparsity = out.sparsity if out.sparsity is not None else l1_penalty(codes, self.dictionary,
                                                                             self.encoder.nonnegative_codes)
        trainer = self._trainer
        coeff = (self.sparsity.value(None) if trainer is None
                 else self.sparsity.value(self.global_step, trainer.estimated_stepping_batches))
        # the objective is a list of terms, each entering the loss at its weight: the reconstruction term's, the
        # sparsity penalty's, the head's own, and the aids'
        terms = {"mse": LossTerm(mse, 1.0), "sparsity": LossTerm(sparsity, coeff)}
        if out.aux_loss is not None:
            terms["aux"] = LossTerm(out.aux_loss, 1.0)
        for aid in self.aids:
            added = (aid.loss_terms(self, x, codes, x_hat, target=target) if self.family.paired
                     else aid.loss_terms(self, x, codes, x_hat))
            for name, term in added.items():
                if name in terms or name in ("l0", "loss"):
                    raise ValueError(f"training aid {aid.name!r} adds a loss term {name!r}, a name already taken")
                terms[name] = term
        losses = {"mse": mse, "sparsity": sparsity}
        if measure_l0:
            # the mean of each sample's count, as one count over the batch: no (batch, n_latents) integer copy
            values = codes.values if isinstance(codes, SparseCodes) else codes
            losses["l0"] = torch.count_nonzero(values.detach()).float() / max(1, values[..., 0].numel())
        losses.update((name, term.value) for name, term in terms.items())
        return {"loss": total_loss(terms.values()), **losses}

    def tuned_losses(self, batch: Batch, measure_l0: bool = False) -> dict[str, Tensor]:
        """:meth:`training_losses` of a training step, after which the sparsity coefficient takes one step
        towards ``target_l0`` (when the model has one; the batch's L0 is then always measured)."""
        targets_l0 = self.sparsity.targets_l0
        losses = self.training_losses(batch, measure_l0=measure_l0 or targets_l0)
        if targets_l0 and "l0" in losses:
            self.sparsity.update(losses["l0"])
        return losses

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logging = logging_step(self.trainer)
        losses = self.step_losses(batch, logging)
        if logging:
            self.log_dict({f"train/{k}": v for k, v in self.step_log(losses).items()})
            self.log("loss", losses["loss"], prog_bar=True, logger=False)
        return losses["loss"]

    def step_losses(self, batch: Batch, logging: bool, name: str | None = None) -> dict[str, Tensor]:
        """The losses of one training step (:meth:`tuned_losses`), alone or in a bank (``name``: this model's
        there). A step that logs reads the values anyway, so it checks the loss is finite at no extra sync."""
        losses = self.tuned_losses(batch, measure_l0=logging)
        if logging and not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"{f'model {name!r}: ' if name else ''}the training loss is "
                                     f"{losses['loss'].item()} at step {self.global_step}: check the inputs for "
                                     "NaN/Inf, or lower the learning rate")
        return losses

    def step_log(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a step that logs records (under ``train/``, or a bank's ``train/NAME/``): the losses, the aids'
        values and, when it is tuned towards a target L0, the sparsity coefficient."""
        values = dict(losses)
        for aid in self.aids:
            values.update(aid.log_values())
        if self.sparsity.targets_l0:
            values["sparsity_coeff"] = self.sparsity.coeff
        return values

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if self.dictionary.trainable:
            self.dictionary.normalize_()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self.before_training_batch(unpack_batch(batch)[0], training_progress(self.trainer))

    def before_training_batch(self, x: Tensor, progress: float | None) -> None:
        """Before a training step on inputs ``x``, ``progress`` (0 to 1) through the run: the head's schedule
        (a top-k head's annealed k), then every aid's :meth:`~sae_zoo.training.TrainingAid.before_batch`."""
        self.encoder.on_train_progress(progress, self.global_step)
        for aid in self.aids:
            aid.before_batch(self, x)

    def resample_dead_latents(self, x: Tensor) -> int:
        """Resample the dead latents on inputs ``x`` (:meth:`DeadLatents.resample`); returns how many. The
        reconstruction that weighs the draw is the model's in eval mode: a training-mode pass would move state
        that training keeps (BatchTopK's threshold estimate) on a batch it does not train on. In a multi-device
        run ``x`` is every rank's slice of the global batch, and the draw's generator is seeded by the run's seed
        and the step, so that every rank resamples alike, as one process would."""
        optimizer = self.bank_optimizer or (self.optimizers().optimizer if self._trainer is not None else None)
        x = gathered_rows(x.reshape(-1, x.shape[-1]))
        with torch.no_grad(), evaluating(self):
            x_hat = self(x).x_hat
        step = int(getattr(self._trainer, "global_step", 0))  # 0 outside a fit
        generator = torch.Generator(device=x.device).manual_seed((torch.initial_seed() + step) % 2**63)
        return self.dead_latents.resample(self.encoder, self.dictionary, x, x_hat, optimizer, generator)

    def reads_training_rows(self) -> str | None:
        """Why the start and end of a run read ``bias_init_samples`` training rows (None: they do not): an aid
        that starts from the data, or a ``target_l0``."""
        readers = [f"{aid.name} aid" for aid in self.aids if aid.reads_rows]
        if self.sparsity.targets_l0:
            readers.append(f"target_l0={self.sparsity.target_l0}")
        return ", ".join(readers) or None

    def on_train_start(self) -> None:
        """A fresh run (not a resumed one) starts each aid and the sparsity (:meth:`start_training`), on training
        rows when one of them reads them."""
        if not self.global_step:
            self.start_training(self._training_rows())

    def on_train_end(self) -> None:
        self.finish_training(self._training_rows())

    def _training_rows(self) -> Tensor | None:
        """``bias_init_samples`` rows of the training data where the start or end of the run reads them."""
        why = self.reads_training_rows()
        return None if why is None else training_sample(self.trainer, self.dictionary.d_model,
                                                        self.training_config.bias_init_samples, why)

    def start_training(self, points: Tensor | None) -> None:
        """Before the first step of a run: every aid's :meth:`~sae_zoo.training.TrainingAid.start` on training
        rows ``points``; then a run that targets an L0 starts its head near the target
        (:func:`sae_zoo.sparsity.start_at_l0`), so that the controller starts near where it settles."""
        for aid in self.aids:
            aid.start(self, points)
        if self.sparsity.targets_l0:
            start_at_l0(self.encoder, points.to(self.dictionary.weight.dtype), self.dictionary, self.sparsity.target_l0)

    def finish_training(self, points: Tensor | None) -> None:
        """After a run: every aid's :meth:`~sae_zoo.training.TrainingAid.finish`. After a run that targets an L0,
        the coefficient it settled on becomes the model's ``l1_coeff`` (config.json, the card), and one shift of
        the head's thresholds lands the L0 of training rows ``points`` on the target
        (:func:`sae_zoo.sparsity.calibrate_l0`; recorded in ``l0_calibration``)."""
        for aid in self.aids:
            aid.finish(self, points)
        if not self.sparsity.targets_l0:
            return
        self.hparams["l1_coeff"] = self.training_config.l1_coeff = float(self.sparsity.coeff)
        with evaluating(self.encoder):
            self.l0_calibration = calibrate_l0(self.encoder, points.to(self.dictionary.weight.dtype), self.dictionary,
                                               self.sparsity.target_l0)

    def update_metrics(self, metrics: SparseCodingMetrics, batch: Batch, out: Reconstruction | None = None) -> None:
        """Add one held-out batch to ``metrics`` (the one way every evaluation scores a model); ``out``: the model's
        output on it, when already computed."""
        x, target, true_codes = self.checked_batch(batch)
        x_hat, codes = out if out is not None else self(x)
        self.scoring.update(metrics, x_hat, target, codes, true_codes, self.dictionary.directions)

    def checked_batch(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, target, true_codes)`` of a batch, as the model's family splits it (an SAE's target is its input; a
        transcoder's comes in its :class:`~sae_zoo.data.Pair` batch), refused by name when it is another's."""
        return self.family.split(batch, self.dictionary.d_model)

    def update_dictionary_metrics(self, metrics: SparseCodingMetrics) -> bool:
        """Score the dictionary against the true one, where the scoring has it (False: it has none)."""
        return self.scoring.update_dictionary(metrics, self.dictionary.directions)

    def _evaluate(self, stage: str, batch: Batch) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        self.update_metrics(metrics, batch)
        for name, metric in metrics.updated().items():
            if name not in metrics.DICTIONARY_METRICS and name != "latent_detection":
                self.log(f"{stage}/{name}", metric, prog_bar=name == "mcc")

    def _log_epoch_metrics(self, stage: str) -> None:
        """The metrics of the whole epoch: the dictionary's (dictionary MCC, uniqueness) and the latents
        as feature detectors (computed over every batch, then reset here)."""
        metrics = getattr(self, f"{stage}_metrics")
        if self.update_dictionary_metrics(metrics):
            for name in metrics.DICTIONARY_METRICS:
                self.log(f"{stage}/{name}", metrics.metrics[name])
        detection = metrics.metrics["latent_detection"] if "latent_detection" in metrics.metrics else None
        if detection is not None and detection.update_count > 0:
            self.log_dict({f"{stage}/latent_{key}": value for key, value in detection.compute().items()})
            detection.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["decoder_provenance"] = self.dictionary.provenance
        checkpoint["sparsity_coeff"] = float(self.sparsity.coeff)
        checkpoint["sparsity_integral"] = float(self.sparsity.integral)
        checkpoint["training_aids"] = {}
        for aid in self.aids:  # each under its name: its buffers, and what its save_state adds
            state: dict[str, Any] = {}
            aid.save_state(state)
            checkpoint["training_aids"][aid.name] = {"buffers": aid.state_dict(), "state": state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.dictionary.provenance = dict(checkpoint.get("decoder_provenance") or {})
        self.sparsity.restore(checkpoint.get("sparsity_coeff", self.l1_coeff), checkpoint.get("sparsity_integral"))
        saved = checkpoint.get("training_aids")
        for aid in self.aids:
            if saved is None:  # a checkpoint from before aids had names there: their state at the top level
                aid.load_state(checkpoint)
            elif aid.name in saved:
                aid.load_state_dict(saved[aid.name]["buffers"])
                aid.load_state(saved[aid.name]["state"])

    def configure_optimizers(self) -> Any:
        """Adam (learned atom norms at ``lr * dictionary.norm_lr_scale``), with the per-step learning-rate
        schedule of the aid that gives one (``lr_warmup_steps``/``lr_decay_steps``: a linear warm-up and final
        decay)."""
        norms = self.dictionary.atom_norms if self.dictionary.learns_norms else None
        params = [p for p in self.parameters() if p.requires_grad and p is not norms]
        if not params:
            raise ValueError("nothing to train: the encoder has no parameters and the dictionary is frozen")
        groups = [{"params": params}]
        if norms is not None:  # see Dictionary.norm_lr_scale
            groups.append({"params": [norms], "lr": self.lr * self.dictionary.norm_lr_scale})
        optimizer = adam(groups, lr=self.lr)
        scheduling = [aid for aid in self.aids if aid.active and gives_schedule(aid)]  # at most one (__init__)
        schedule = scheduling[0].schedule(optimizer, self.trainer.estimated_stepping_batches) if scheduling else None
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- Hugging Face Hub (ModelHubMixin): sae_zoo's files in sae_zoo.pretrained, transport in sae_zoo.hub ----

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> str | None:
        """The mixin's ``save_pretrained`` (``config.json``, ``model.safetensors``, ``README.md``), made
        atomic: the files are written into a staging folder that then replaces ``save_directory`` whole."""
        if config is not None:
            raise TypeError("config.json is built from the model itself; save_pretrained takes no config")
        with atomic_directory(save_directory, replaces=(CONFIG_NAME,)) as staging:
            super().save_pretrained(staging, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, save_directory / WEIGHTS_NAME)
        atomic_write_json(save_directory / CONFIG_NAME, model_config(self))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "SparseCoder":
        """The mixin's ``from_pretrained``: a folder or Hub repo (``revision=`` a branch, tag or commit)
        written by ``save_pretrained``/``push_to_hub``. ``config.json`` is read and checked first, so a
        missing, corrupt or foreign one is reported by name before the mixin reads it. The head, dictionary, family
        and training config come from ``config.json``; further keyword arguments may set any training option (over
        the saved one: ``lr=1e-4``), ``true_dictionary`` (to score against) and ``map_location``. Returns the model
        in eval mode."""
        download = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "token", "local_files_only")
                    if k in kwargs}
        read_model_config(pretrained_model_name_or_path, **download)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu", **model_kwargs: Any) -> "SparseCoder":
        download = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "token": token,
                    "local_files_only": local_files_only}
        config, config_path = read_model_config(model_id, **download)
        saved = ModelConfig.from_dict(config, where=str(config_path))
        overrides = {k: v for k, v in model_kwargs.items() if k in PRETRAINED_OVERRIDES}
        # the mixin passes config.json's values for the __init__ arguments it names: those are not overrides
        unexpected = sorted(k for k, v in model_kwargs.items()
                            if k not in PRETRAINED_OVERRIDES and not (k in config and config[k] == v)
                            and k not in ("proxies", "resume_download"))
        if unexpected:
            raise TypeError(f"from_pretrained got unexpected arguments {', '.join(unexpected)}; the head and dictionary "
                            "come from config.json (to pair a pretrained head with another dictionary, use "
                            "sae_zoo.pretrained.load_encoder), and any training option may be set")
        scoring = Scoring(true_dictionary=overrides.pop("true_dictionary", None))
        training = dataclasses.replace(saved.training, **overrides)
        model = cls(build_encoder(config, config_path), build_dictionary(config, config_path), training,
                    family=saved.family, scoring=scoring)
        model.to(getattr(torch, config["dtype"]))
        weights_path = resolve_file(model_id, WEIGHTS_NAME, **download)
        load_state(model, read_safetensors(weights_path), weights_path, config_path)
        return model.to(map_location).eval()

    def generate_model_card(self, **card_kwargs: Any) -> ModelCard:
        """The model card (``README.md``), rendered from ``model_cards/sae_zoo.md``; ``card_kwargs`` are
        those of :func:`sae_zoo.pretrained.model_card` (test ``metrics``, the ``recipe``, ``repo_id``)."""
        return model_card(self, **card_kwargs)


#: what ``from_pretrained`` may set beside config.json (for further training, or scoring): any training option, and
#: the true dictionary to score against
PRETRAINED_OVERRIDES = (*TRAINING_FIELDS, "true_dictionary")
#: the keys that have always set a SparseCoder's family (read into it once: :func:`family_from_options`)
LEGACY_FAMILY_KEYS = ("transcoder", "skip_connection", "train_skip")
