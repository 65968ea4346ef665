"""SAELens's own SAEs, trained by SAELens's own trainer on the samples sae_zoo's runs see, and scored by
the same evaluation: the side-by-side rows of a suite (``saelens:`` in a run).

A run's ``saelens`` mapping names the architecture (``batchtopk``, ``matryoshka_batchtopk``, ``topk``,
``jumprelu``, ``standard``, ...) and any keys of its SAELens training config (``k``,
``matryoshka_widths``, ...); ``d_in`` and ``d_sae`` come from the data and ``dictionary.n_latents``. The
trainer takes SAELens's synthetic-runner defaults (``SyntheticSAERunnerConfig``), with the recipe's
``model.lr`` (where it gives none, the one sae_zoo's run of the recipe takes: the head's default, else
:class:`~sae_zoo.SparseCoder`'s), ``data.batch_size`` and ``trainer.max_steps`` (required), and any runner keys under
``saelens.trainer`` (e.g. ``dead_feature_window``). The trained SAE is saved in SAELens's
inference format (``RUN_DIR/saelens/``), loaded back through :func:`sae_zoo.load_sae` (which gives
SAELens's codes exactly) and evaluated like every other run (:func:`sae_zoo.recipe.evaluate_run`).
``metrics.json`` also holds what SAELens's own ``eval_sae_on_synthetic_data`` reports on fresh samples of
the same generator.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ._io import atomic_directory
from .hub import load_sae
from .data.base import unpack_batch
from .metrics import Scoring
from .recipe import RecipeError, RunFolder, evaluate_run, initialising, plan
from .training_config import TrainingConfig

#: samples SAELens's evaluator draws for its own figures
SAELENS_EVAL_SAMPLES = 16_384
#: the learning rate of a run whose recipe gives none: sae_zoo's own default (:class:`~sae_zoo.SparseCoder`)
DEFAULT_LR = TrainingConfig.lr


def _steps(trainer_kwargs: dict[str, Any], where: str) -> int:
    """The run's step count: ``trainer.max_steps``, as sae_zoo's runs of the recipe take it."""
    steps = trainer_kwargs.get("max_steps", -1)
    if steps is None or steps < 1:
        raise RecipeError(f"{where}: a SAELens run trains for trainer.max_steps steps; the recipe's trainer section "
                          "sets none (sae_zoo's runs would train for Lightning's default epochs): set it")
    return int(steps)


def _batches(datamodule: Any, device: str) -> Iterator[torch.Tensor]:
    """The inputs of the datamodule's training batches (without the true codes that synthetic data carries), pass
    after pass, as SAELens's trainer pulls them."""
    for _ in itertools.count():
        for batch in datamodule.train_dataloader():
            yield unpack_batch(batch)[0].to(device)


def _device(trainer_kwargs: dict[str, Any]) -> str:
    """Where the recipe's Trainer would run: a GPU when it may use one and one is there."""
    wants_gpu = trainer_kwargs.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def saelens_config(architecture: str, options: dict[str, Any], d_in: int, d_sae: int, where: str) -> tuple[type, Any]:
    """SAELens's training-SAE class of ``architecture`` and its config; a key or value SAELens refuses raises
    RecipeError."""
    from sae_lens.registry import get_sae_training_class

    try:
        sae_class, config_class = get_sae_training_class(architecture)
    except (KeyError, ValueError) as e:
        raise RecipeError(f"{where}: saelens.architecture {architecture!r} is not a SAELens architecture "
                          f"({e})") from None
    try:
        return sae_class, config_class.from_dict({"d_in": d_in, "d_sae": d_sae, **options})
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: SAELens rejects saelens={options!r} for {architecture}: {e}") from None


def fit_saelens(cfg: DictConfig, saelens: dict[str, Any], recipe_name: str = "recipe",
                where: str = "saelens run") -> tuple[Path, dict[str, Any]]:
    """Train SAELens's ``saelens["architecture"]`` SAE on the recipe's data; returns ``(run_dir, metrics)``."""
    from sae_lens.config import LoggingConfig
    from sae_lens.synthetic import SyntheticSAERunnerConfig, eval_sae_on_synthetic_data
    from sae_lens.training.sae_trainer import SAETrainer

    options = dict(saelens)
    architecture, runner_options = options.pop("architecture", None), dict(options.pop("trainer", None) or {})
    if architecture is None:
        raise RecipeError(f"{where}: saelens.architecture is required (e.g. batchtopk)")
    p = plan(cfg)
    run = RunFolder(cfg, recipe_name)
    n_latents = p.dictionary_kwargs.get("n_latents")
    if cfg.setting != "unknown" or n_latents is None:
        raise RecipeError(f"{where}: a SAELens run learns its dictionary: it needs setting=unknown and "
                          "dictionary.n_latents")
    if p.hooks is not None or p.data_kwargs.get("hook_out") is not None or p.model_kwargs.get("transcoder"):
        raise RecipeError(f"{where}: SAELens's trainer trains an SAE on one stream of activations (its training step "
                          "reads sae_in alone): it has no transcoder or several-hooks training to compare with")
    datamodule = p.data_class(**p.data_kwargs)
    steps = _steps(p.trainer_kwargs, where)
    # the rows of a training batch: data.batch_size, or all of them where the data trains full-batch (the paper's)
    batch_size = datamodule.hparams.get("batch_size") or len(unpack_batch(next(iter(datamodule.train_dataloader())))[0])
    device = _device(p.trainer_kwargs)
    sae_class, sae_cfg = saelens_config(architecture, {"device": device, **options}, datamodule.d_model, n_latents,
                                        where)
    try:
        trainer_cfg = SyntheticSAERunnerConfig(synthetic_model="the recipe's data", sae=sae_cfg,
                                               training_samples=steps * batch_size, batch_size=batch_size,
                                               lr=float(p.model_kwargs.get("lr", DEFAULT_LR)),
                                               logger=LoggingConfig(log_to_wandb=False), device=device,
                                               **runner_options).to_sae_trainer_config()
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: SAELens rejects saelens.trainer={runner_options!r}: {e}") from None
    run.start({**OmegaConf.to_container(cfg), "saelens": saelens})
    datamodule.prepare_data()
    with initialising(cfg.seed):
        sae = sae_class(sae_cfg)
        start = time.perf_counter()
        trained = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(datamodule, device),
                             save_checkpoint_fn=lambda path: None).fit()
        train_seconds = time.perf_counter() - start
    with atomic_directory(run.path / "saelens", replaces=("cfg.json",)) as staging:
        trained.save_inference_model(staging)
    loaded = load_sae(run.path / "saelens")
    model = loaded.model().to(device)
    model.score_with(Scoring.from_data(datamodule, code_recovery=p.model_kwargs.get("code_recovery")))
    test = evaluate_run(model, datamodule, p.probing)
    theirs = eval_sae_on_synthetic_data(trained, datamodule.generator.feature_dict,
                                        datamodule.generator.activation_generator, num_samples=SAELENS_EVAL_SAMPLES,
                                        batch_size=batch_size) if hasattr(datamodule, "generator") else None
    extra = {} if theirs is None else {"saelens_evaluator": theirs.to_dict()}
    metrics = run.finish(datamodule, model, test, encoder=f"saelens:{architecture}", steps=steps,
                         train_seconds=train_seconds, devices=1, extra=extra)
    return run.path, metrics
