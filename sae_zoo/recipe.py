"""Recipes: omegaconf YAML (plus ``key=value`` overrides) -> datamodule + SparseCoder -> a run directory.

A recipe has the sections of :class:`Recipe`. ``data``, ``encoder``, ``dictionary``, ``model`` and
``trainer`` hold keyword arguments, checked (names and types) against what they configure (the
datamodule, the encoder head, :class:`~sae_zoo.Dictionary`, :class:`~sae_zoo.SparseCoder`,
``lightning.Trainer``) before any work starts, so a misspelt key or a wrong value fails at once with
its name.

One way through: :func:`plan` resolves a recipe once into a :class:`Plan`; :func:`build` makes its
datamodule and model, :func:`make_trainer` its Trainer, and :func:`fit` trains and evaluates through
:mod:`sae_zoo.evaluation`. ``sae-zoo fit``, suites, the frontier and the demo all go this way.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import flops
from ._io import atomic_write, atomic_write_json, atomic_write_text, cache_key
from ._signature import UnknownArgumentError, check_kwargs, section_kwargs
from .data import PAPER_SEED, SparseCodingData, get_datamodule_class
from .clt import CrossLayerTranscoder
from .clt_recipe import build_clt, check_clt_recipe, describe_clt, evaluate_clt, is_clt_recipe
from .data.multi_hook import MultiHookData, check_hooks, hook_name
from .dictionary import Dictionary
from .encoders import create_encoder, get_encoder_class
from .evaluation import ProbingConfig, evaluate_model
from .hub import load_sae
from .families import ModelFamily, create_family, family_from_options, refused_recipe_keys
from .metrics import Scoring
from .model import SparseCoder
from .multihead import HeadBank
from .checkpoints import CHECKPOINT, PeriodicCheckpoint
from .clock import TrainingClock
from .tracking import logger_specs, make_loggers
from .training import get_training_aid_class
from .training_config import FIELD_AIDS, ModelOptions

SETTINGS = ("known_codes", "known_dictionary", "unknown")

#: The authors' code initialises every model under ``torch.manual_seed(seed + 42)``; doing the same
#: makes ``seed=20240625 ... 20240629`` reproduce their runs exactly.
INIT_SEED_OFFSET = 42


@dataclass
class Recipe:
    """The schema of a recipe. Defaults are the paper's known-dictionary SAE run."""

    #: ``known_codes`` (supervised), ``known_dictionary`` (frozen true decoder) or ``unknown`` (both learned).
    setting: str = "known_dictionary"
    #: Seeds the model's initialisation (and Lightning's RNGs); ``data.seed`` seeds the data.
    seed: int = PAPER_SEED
    data: dict[str, Any] = field(default_factory=lambda: {"name": "synthetic"})
    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "linear", "bias": False})
    #: Only for ``setting=unknown``: ``n_latents`` (default: the data's) and ``bias``.
    dictionary: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=lambda: {"l1_coeff": 0.01, "lr": 1e-3})
    trainer: dict[str, Any] = field(default_factory=lambda: {"max_steps": 20_000})
    #: Sparse probing of runs on language-model activations (:class:`~sae_zoo.evaluation.ProbingConfig`).
    probing: dict[str, Any] = field(default_factory=dict)
    #: Where the run is written; default ``runs/<recipe>/<encoder>-seed<seed>-<time>``.
    run_dir: Optional[str] = None
    #: Modules (dotted names or ``.py`` paths) imported first, e.g. to register encoder heads.
    imports: list[str] = field(default_factory=list)
    #: ``torch.compile`` the model for training (same results as eager, to float tolerance).
    compile: bool = False
    #: ``torch.set_float32_matmul_precision`` while the run lasts: ``highest`` (exact float32),
    #: ``high`` (TF32 on GPUs that have it), ``medium``. Mixed precision is ``trainer.precision``.
    matmul_precision: str = "highest"
    #: Experiment trackers beside ``logs/metrics.csv`` (:mod:`sae_zoo.tracking`): names or ``{name: {options}}``,
    #: e.g. ``[tensorboard, {wandb: {project: saes, mode: offline}}]``.
    loggers: list[Any] = field(default_factory=list)
    #: Write ``checkpoint.ckpt`` into the run folder every N training steps (atomically), so that ``sae-zoo fit
    #: --resume RUN_DIR`` continues a killed run exactly where its last checkpoint left it.
    checkpoint_every: Optional[int] = None


#: A recipe may hold a ``quick:`` mapping, merged over the recipe by ``--quick`` for a run of minutes.
QUICK_KEY = "quick"
#: an override's key: names joined by single dots
DOTTED_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


#: Trainer arguments every recipe starts from (fit, suites, frontier, demo); any ``lightning.Trainer``
#: argument may be set under ``trainer``.
TRAINER_DEFAULTS: dict[str, Any] = {"accelerator": "auto", "devices": 1, "log_every_n_steps": 100,
                                    "enable_model_summary": False, "enable_checkpointing": False}


#: Full-batch steps take well under a millisecond; redrawing the bar every step would dominate.
PROGRESS_REFRESH_STEPS = 50


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file and key at fault."""


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                quick: bool = False) -> DictConfig:
    """Read a recipe (or start from the defaults when ``path`` is None), apply its ``quick`` preset
    when asked, then ``key=value`` overrides, and check every key. Returns the resolved, validated config."""
    source = str(path) if path is not None else "<default recipe>"
    content = apply_quick(read_recipe_file(path) if path is not None else {}, quick, source)
    return recipe_from_content(content, overrides, source)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    if Path(path).is_dir():
        raise RecipeError(f"{path}: is a folder, not a recipe file (e.g. {Path(path) / 'recipe.yaml'})")
    try:
        content = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(content, (dict, type(None))):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys, got {type(content).__name__}")
    return content or {}


def recipe_from_content(content: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                        source: str = "<recipe>") -> DictConfig:
    """The validated recipe of ``content`` (a recipe file's mapping) with ``key=value`` overrides."""
    assignments, deletions = [], []
    for item in overrides:
        deleting = item.startswith("~")
        if not deleting and "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value (or ~key to delete a key)")
        key = item[1:] if deleting else item.split("=", 1)[0]
        if not DOTTED_KEY.fullmatch(key):
            raise RecipeError(f"override {item!r}: {key!r} is not a key (names joined by single dots, "
                              "e.g. encoder.name)")
        if deleting:
            deletions.append(key)
        else:
            assignments.append(item)
    try:
        cfg = _with_defaults(content)  # a file's keys are checked as the command line's are
        for key in deletions:
            _delete(cfg, key, source)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(assignments))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        valid = ", ".join(Recipe.__dataclass_fields__)
        reason = str(e).splitlines()[0]
        raise RecipeError(f"{source}: bad key {key!r}: {reason} (top-level keys: {valid})") from None
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from None
    except yaml.YAMLError as e:  # a value the override parser cannot read, e.g. trainer.max_steps=[5
        reason = str(e).splitlines()[0]
        raise RecipeError(f"{source}: an override's value is not valid YAML ({reason}); quote it, or close the "
                          f"bracket: {', '.join(assignments)}") from None
    try:
        apply_head_defaults(cfg)
        validate(cfg)
    except UnknownArgumentError as e:
        overridden = {a.split("=", 1)[0] for a in assignments}
        from_recipe = [k for k in e.names if k not in overridden]
        hint = f" (the recipe sets {from_recipe[0]}: drop it with ~{from_recipe[0]})" if from_recipe else ""
        raise RecipeError(f"{source}: {e}{hint}") from None
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from None
    return cfg


#: Sections that hold keyword arguments: a recipe that gives one replaces the default section whole
#: (an ``encoder: {name: fista}`` must not inherit the default SAE's ``bias``).
KWARG_SECTIONS = ("data", "encoder", "dictionary", "model", "trainer", "probing")


def apply_quick(content: dict[str, Any], quick: bool, source: str) -> dict[str, Any]:
    """``content`` without its ``quick`` preset, or (``quick=True``) with the preset merged over it:
    the one meaning of ``--quick`` for recipes, suites and frontiers. Mappings merge key by key, any
    other value (a list, a number) replaces the recipe's, and a key set to ``null`` is removed."""
    content = dict(content)
    preset = content.pop(QUICK_KEY, None)
    if not quick:
        return content
    if not isinstance(preset, dict):
        raise RecipeError(f"{source}: --quick needs a '{QUICK_KEY}:' mapping in the recipe")
    return _merge(content, preset)


def _merge(base: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in preset.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_defaults(content: dict[str, Any]) -> DictConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(Recipe), {k: v for k, v in content.items() if k not in KWARG_SECTIONS})
    for key in KWARG_SECTIONS:
        if key in content:
            value = content[key]
            if not isinstance(value, dict):
                raise ValueError(f"{key}: must be a mapping of arguments, got {value!r}")
            cfg[key] = value
    return cfg


def apply_head_defaults(cfg: DictConfig) -> None:
    """A run that learns its dictionary (``setting: unknown``, no ``dictionary.pretrained``) gets its head's
    ``learned_dictionary_defaults`` (e.g. a BatchTopK SAE: learned atom norms, a decoder bias subtracted
    before encoding, a tied start) for every key the recipe leaves unset; the run's ``config.yaml`` then
    shows them. Setting a key, e.g. ``dictionary.atom_norms=false``, overrides its default. A recipe leaves out
    what its family refuses (:func:`~sae_zoo.families.refused_recipe_keys`; a transcoder's, from ``data.hook_out``,
    ``model.family: transcoder`` or ``model.transcoder``: a decoder bias subtracted from the input, a tied
    start)."""
    if cfg.setting != "unknown" or "pretrained" in cfg.dictionary or "name" not in cfg.encoder or is_clt_recipe(cfg):
        return  # a CLT's heads take their hyper-parameters as given: the SAE's training defaults are not its own
    import_modules(list(cfg.imports))
    try:
        head = get_encoder_class(cfg.encoder.name)
    except ValueError:
        return  # validate() names the unknown head
    pairs = [h for h in (cfg.data.get("hooks") or []) if not isinstance(h, str)]
    paired = cfg.data.get("hook_out") is not None or bool(pairs)
    try:  # the family build() will read (recipe_family), from the same keys
        family = family_from_options(cfg.model.get("family"), transcoder=cfg.model.get("transcoder"),
                                     default="transcoder" if paired else "sae")
        refused = refused_recipe_keys(family)
    except (TypeError, ValueError):
        refused = {}  # an unknown family, or keys that disagree: build() names them
    for section, defaults in head.learned_dictionary_defaults.items():
        for key, value in defaults.items():
            if key not in cfg[section] and key not in refused.get(section, ()):
                cfg[section][key] = value


def _delete(cfg: DictConfig, key: str, source: str) -> None:
    """Remove ``key`` (dotted) from a section such as ``encoder``; top-level keys cannot be removed."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else None
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise RecipeError(f"{source}: cannot delete {key!r}: the recipe has no such key inside a section")
    del parent[leaf]


def _named(section: Any, key: str) -> tuple[str, dict[str, Any]]:
    kwargs = section_kwargs(section)
    if "name" not in kwargs:
        raise ValueError(f"{key}.name is required")
    return kwargs.pop("name"), kwargs


def check_training_aid(spec: Any, key: str) -> None:
    """A recipe's training aid (``{name: ..., **options}``): a registered name, with options its class takes."""
    if not isinstance(spec, dict):
        raise ValueError(f"{key} must be a mapping with a name (a registered training aid), got {spec!r}")
    name, options = _named(spec, key)
    if name in FIELD_AIDS:  # the field's aids, read into the model's options (sae_zoo.TrainingConfig)
        unknown = sorted(set(options) - set(FIELD_AIDS[name]))
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: the {name!r} aid takes {', '.join(FIELD_AIDS[name])}")
        return
    try:
        aid_class = get_training_aid_class(name)
    except ValueError as e:
        raise ValueError(f"{key}.name: {e}; or one of the field's: {', '.join(FIELD_AIDS)}") from None
    check_kwargs(aid_class.__init__, options, what=f"training aid {name!r}", key_prefix=f"{key}.")


#: the ``.py`` files :func:`import_modules` has imported, by resolved path
_IMPORTED_FILES: set[Path] = set()


def import_modules(modules: list[str]) -> None:
    """Import dotted module names or ``.py`` files (which register heads as a side effect). A file is imported
    once (by its resolved path), under its stem, or a name of its own when another module has that stem (a
    user's ``utils.py`` beside some package's ``utils``)."""
    for module in modules:
        if module.endswith(".py"):
            file = Path(module)
            if not file.is_file():
                raise ValueError(f"imports: no such file {module}")
            path = file.resolve()
            same_stem = sys.modules.get(file.stem)
            if path in _IMPORTED_FILES or (getattr(same_stem, "__file__", None)
                                           and Path(same_stem.__file__).resolve() == path):
                continue
            name = file.stem if same_stem is None else f"{file.stem}_{cache_key(str(path))}"
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[name]  # a file that failed to import is not half-registered as imported
                raise
            _IMPORTED_FILES.add(path)
        else:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"imports: cannot import {module!r}: {e}") from None


@dataclass
class Plan:
    """A recipe resolved once: what :func:`build` makes and :func:`make_trainer` runs."""

    cfg: DictConfig
    data_class: type[SparseCodingData]
    data_kwargs: dict[str, Any]
    encoder_name: str
    encoder_kwargs: dict[str, Any]
    #: a pretrained dictionary's source (``load_sae``), or None
    pretrained: str | None
    #: the learned dictionary's arguments (``setting=unknown``), ``n_latents`` included when given
    dictionary_kwargs: dict[str, Any]
    model_kwargs: dict[str, Any]
    trainer_kwargs: dict[str, Any]
    probing: ProbingConfig
    #: the recipe's ``loggers`` (:func:`~sae_zoo.tracking.logger_specs`), beside the CSV log
    loggers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: ``data.hooks``: ``(hook, hook_out or None)`` of each model trained from one LM pass, or None
    hooks: list[tuple[str, str | None]] | None = None


def plan(cfg: DictConfig) -> Plan:
    """Check every section against what it configures and resolve the recipe; raises ``ValueError``
    naming the key."""
    if cfg.matmul_precision not in ("highest", "high", "medium"):
        raise ValueError(f"matmul_precision: {cfg.matmul_precision!r} is not one of highest, high, medium")
    if cfg.setting not in SETTINGS:
        raise ValueError(f"setting: {cfg.setting!r} is not one of {', '.join(SETTINGS)}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {cfg.checkpoint_every}")
    import_modules(list(cfg.imports))
    data_name, data_kwargs = _named(cfg.data, "data")
    try:
        data_class = get_datamodule_class(data_name)
    except ValueError as e:
        raise ValueError(f"data.name: {e}") from None
    hooks = data_kwargs.pop("hooks", None)
    if hooks is not None:
        hooks = check_hooks(hooks)
        if data_name != "activations":
            raise ValueError(f"data.hooks: data {data_name!r} reads no language model; data.name=activations does")
        given = [k for k in ("hook", "hook_out") if k in data_kwargs]
        if given:
            raise ValueError(f"data.{given[0]}: data.hooks names every hook; drop data.{given[0]}")
        if len({out is None for _, out in hooks}) > 1:
            raise ValueError("data.hooks mixes hooks (SAEs) and [input, target] pairs (transcoders); a recipe trains "
                             "one kind")
    check_kwargs(data_class.__init__, {**data_kwargs, **({"hook": hooks[0][0]} if hooks else {})},
                 what=f"data {data_name!r}", key_prefix="data.")
    data_class.check_arguments(data_kwargs)
    encoder_name, encoder_kwargs = _named(cfg.encoder, "encoder")
    try:
        encoder_cls = get_encoder_class(encoder_name)
    except ValueError as e:
        raise ValueError(f"encoder.name: {e}") from None
    warm_start = encoder_kwargs.get("warm_start")
    pretrained_warm_start = isinstance(warm_start, dict) and "pretrained" in warm_start
    check_kwargs(encoder_cls.__init__, {k: v for k, v in encoder_kwargs.items()
                                        if not (k == "warm_start" and pretrained_warm_start)},
                 what=f"encoder {encoder_name!r}", skip=("d_model", "n_latents"), key_prefix="encoder.")
    dictionary_kwargs = section_kwargs(cfg.dictionary)
    ground_truth = data_class.ground_truth
    pretrained = dictionary_kwargs.pop("pretrained", None)
    if cfg.setting == "known_codes" and not ground_truth:
        raise ValueError(f"setting: data {data_name!r} has no true codes to train on; use unknown or known_dictionary")
    if pretrained is not None:
        if cfg.setting == "known_codes":
            raise ValueError("dictionary.pretrained: applies to setting=known_dictionary (frozen) or unknown (trained on)")
        if dictionary_kwargs:
            raise ValueError(f"dictionary.{next(iter(dictionary_kwargs))}: a pretrained dictionary brings its own shape")
    elif cfg.setting != "unknown":
        if not ground_truth:
            raise ValueError(f"dictionary.pretrained: data {data_name!r} has no true dictionary; the "
                             f"{cfg.setting} setting needs dictionary.pretrained (a run directory, an SAE folder or repo)")
        if dictionary_kwargs:
            raise ValueError(f"dictionary.{next(iter(dictionary_kwargs))}: the {cfg.setting} setting uses the data's "
                             "true dictionary; dictionary keys apply to setting=unknown only")
    elif not ground_truth and "n_latents" not in dictionary_kwargs:
        raise ValueError(f"dictionary.n_latents must be given: data {data_name!r} has no true latent count to "
                         "default to")
    n_latents = dictionary_kwargs.get("n_latents", 1)
    if not isinstance(n_latents, int) or isinstance(n_latents, bool) or n_latents < 1:
        raise ValueError(f"dictionary.n_latents must be a positive integer, got {n_latents!r}")
    check_kwargs(Dictionary.__init__, {k: v for k, v in dictionary_kwargs.items() if k != "n_latents"},
                 what="the dictionary", skip=("n_latents", "d_model", "trainable"), key_prefix="dictionary.")
    model_kwargs = section_kwargs(cfg.model)
    check_kwargs(ModelOptions, model_kwargs, what="SparseCoder", skip=("supervised",), key_prefix="model.")
    for i, spec in enumerate(model_kwargs.get("aids", [])):
        check_training_aid(spec, f"model.aids[{i}]")
    try:  # the options' own checks (lr > 0, l1_coeff >= 0, ...), named as the recipe writes them
        ModelOptions(**model_kwargs)
    except ValueError as e:  # each message starts with the option's name
        raise ValueError(f"model.{e}") from None
    trainer_kwargs = section_kwargs(cfg.trainer)
    check_kwargs(L.Trainer.__init__, trainer_kwargs, what="lightning.Trainer",
                 skip=("logger", "default_root_dir", "callbacks"), key_prefix="trainer.")
    probing_kwargs = section_kwargs(cfg.probing)
    check_kwargs(ProbingConfig.__init__, probing_kwargs, what="sparse probing", key_prefix="probing.")
    return Plan(cfg, data_class, data_kwargs, encoder_name, encoder_kwargs, pretrained, dictionary_kwargs,
                model_kwargs, {**TRAINER_DEFAULTS, **trainer_kwargs}, ProbingConfig(**probing_kwargs),
                recipe_loggers(cfg), hooks)


def recipe_loggers(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """The recipe's ``loggers`` (:func:`~sae_zoo.tracking.logger_specs`), checked."""
    loggers = cfg.get("loggers") or []
    return logger_specs(OmegaConf.to_container(loggers, resolve=True) if OmegaConf.is_config(loggers) else loggers)


def validate(cfg: DictConfig) -> None:
    """Check the recipe (see :func:`plan`; a cross-layer transcoder's: :func:`~sae_zoo.clt_recipe.check_clt_recipe`)."""
    if is_clt_recipe(cfg):
        check_clt_recipe(cfg)
        return
    plan(cfg)


def build(cfg: DictConfig | Plan, datamodule: SparseCodingData | None = None) -> tuple[SparseCodingData, SparseCoder]:
    """The datamodule (``datamodule``, when it is already built) and the SparseCoder a recipe (or its plan)
    describes."""
    p = cfg if isinstance(cfg, Plan) else plan(cfg)
    cfg = p.cfg
    if p.hooks:
        raise RecipeError("data.hooks trains one model per hook: build each hook's recipe (hook_recipes)")
    datamodule = p.data_class(**p.data_kwargs) if datamodule is None else datamodule
    d_model, d_out = datamodule.d_model, datamodule.d_out
    model_kwargs = dict(p.model_kwargs)
    family = recipe_family(model_kwargs, datamodule)
    transcoder = family.paired
    loaded = functools.cache(load_sae)  # the dictionary and a warm start often come from the same SAE
    pretrained_dictionary = pretrained_skip = None
    if p.pretrained is not None:
        source = loaded(p.pretrained)
        if source.transcoder != transcoder:
            kinds = {True: "a transcoder", False: "an SAE"}
            raise RecipeError(f"dictionary.pretrained: {p.pretrained} is {kinds[source.transcoder]}'s decoder, and "
                              f"this recipe trains {kinds[transcoder]}")
        pretrained_dictionary = source.dictionary.requires_grad_(cfg.setting == "unknown").train()
        pretrained_skip = source.skip
        if pretrained_dictionary.d_model != d_out:
            raise RecipeError(f"dictionary.pretrained: {p.pretrained} has atoms of width {pretrained_dictionary.d_model}, "
                              f"but the data's {'targets' if transcoder else 'inputs'} are {d_out} wide")
    dictionary_kwargs = dict(p.dictionary_kwargs)
    n_latents = (pretrained_dictionary.n_latents if pretrained_dictionary is not None
                 else dictionary_kwargs.pop("n_latents", datamodule.n_latents))

    L.seed_everything(cfg.seed, verbose=False)
    with initialising(cfg.seed):
        encoder_kwargs = dict(p.encoder_kwargs)
        warm_start = encoder_kwargs.get("warm_start")
        if isinstance(warm_start, dict) and "pretrained" in warm_start:  # a trained head, e.g. the SAE's own
            source = warm_start["pretrained"]
            head = loaded(source).encoder
            if head is None:
                raise RecipeError(f"encoder.warm_start.pretrained: {source} has no encoder head to start from")
            encoder_kwargs["warm_start"] = head.requires_grad_(False)  # used as trained, not trained further
        encoder = create_encoder(p.encoder_name, d_model=d_model, n_latents=n_latents, **encoder_kwargs)
        if pretrained_dictionary is not None:
            dictionary = pretrained_dictionary
        elif cfg.setting == "unknown":
            dictionary = Dictionary(n_latents, d_out, trainable=True, **dictionary_kwargs)
            dictionary.provenance = {"source": "trained with the encoder"}
        else:
            dictionary = Dictionary.from_tensor(datamodule.dictionary, trainable=False,
                                                provenance={"source": "the data's true dictionary"})
    if pretrained_skip is not None:  # a skip-transcoder's decoder comes with its skip term, trained alike
        if p.model_kwargs.get("skip_connection") is False:
            raise RecipeError(f"model.skip_connection=false, but {p.pretrained} is a skip-transcoder: its decoder "
                              "writes the target beside its skip term")
        family = create_family(family.name, skip_connection=True,
                               train_skip=p.model_kwargs.get("train_skip", cfg.setting == "unknown"))
    if datamodule.ground_truth:
        check_target_l0(model_kwargs.get("target_l0"), datamodule, n_latents)
    scoring = Scoring.from_data(datamodule, learned=cfg.setting == "unknown" or p.pretrained is not None,
                                code_recovery=model_kwargs.pop("code_recovery", None))
    model = SparseCoder(encoder, dictionary, supervised=cfg.setting == "known_codes", family=family,
                        scoring=scoring, **model_kwargs)
    if pretrained_skip is not None:
        with torch.no_grad():
            model.skip.weight.copy_(pretrained_skip)
    return datamodule, model


@contextmanager
def initialising(seed: int) -> Iterator[None]:
    """The RNG a run's model is initialised under (``seed`` + :data:`INIT_SEED_OFFSET`), forked so that the
    data's draws do not depend on it; every run (sae_zoo's or a peer library's) starts in it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed + INIT_SEED_OFFSET)
        yield


def recipe_family(model_kwargs: dict[str, Any], datamodule: SparseCodingData) -> ModelFamily:
    """The family a recipe's ``model`` section names (``family``, or the ``transcoder``, ``skip_connection`` and
    ``train_skip`` keys recipes have always written: popped from ``model_kwargs``), else the one its data fit
    (paired data: a transcoder), checked against the data."""
    keys = {key: model_kwargs.pop(key) for key in ("family", "transcoder", "skip_connection", "train_skip")
            if key in model_kwargs}
    try:
        family = family_from_options(keys.pop("family", None), **{k: v for k, v in keys.items() if v is not None},
                                     default="transcoder" if datamodule.paired else "sae")
        family.check_data(datamodule)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"model: {e}") from None
    return family


def check_target_l0(target_l0: float | None, datamodule: SparseCodingData, n_latents: int) -> None:
    """Refuse a target L0 the tuning cannot reach: the controller only ever adds sparsity pressure, so the
    codes settle at most near the data's own L0, times the width ratio where the model has more latents
    than the data have features (features split over several latents)."""
    true_l0 = datamodule.true_l0
    if target_l0 is None or true_l0 is None:
        return
    ratio = max(1.0, n_latents / datamodule.n_latents)
    if target_l0 > true_l0 * ratio:
        raise RecipeError(f"model.target_l0: {target_l0} is unreachable: the data's true L0 is {true_l0:.3g} and the "
                          f"width ratio {n_latents}/{datamodule.n_latents} allows at most {true_l0 * ratio:.3g}; "
                          "choose a target at or below it")


def make_trainer(p: Plan | dict[str, Any], *, callbacks: Sequence[L.Callback] = (), logger: Any = False,
                 progress: bool = True, root_dir: Path | None = None, **overrides: Any) -> L.Trainer:
    """The recipe's Trainer (any accelerator): :data:`TRAINER_DEFAULTS`, then ``trainer:`` (of the plan ``p``, or
    the mapping ``p`` itself, for a run that has no recipe), then ``overrides``. A Trainer that cannot be built
    (no such accelerator, a bad precision or step count) raises :class:`RecipeError` naming the ``trainer``
    section."""
    trainer_kwargs = p.trainer_kwargs if isinstance(p, Plan) else {**TRAINER_DEFAULTS, **p}
    kwargs = {**trainer_kwargs, "enable_progress_bar": progress and trainer_kwargs.get("enable_progress_bar", True),
              **overrides}
    if kwargs["enable_progress_bar"]:
        callbacks = [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS)]
    try:
        return L.Trainer(**kwargs, callbacks=list(callbacks), logger=logger, default_root_dir=root_dir)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as e:  # what Lightning
        # raises for bad arguments (a device it lacks; an accelerator whose package is missing); a bug stays itself
        given = ", ".join(f"trainer.{k}={v!r}" for k, v in trainer_kwargs.items() if k not in TRAINER_DEFAULTS
                          or TRAINER_DEFAULTS[k] != v)
        raise RecipeError(f"trainer: lightning.Trainer cannot be built from {given or 'the defaults'}: "
                          f"{str(e).splitlines()[0]}") from e


def default_run_dir(cfg: DictConfig, recipe_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / recipe_name / f"{cfg.encoder.name}-seed{cfg.seed}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


class RunFolder:
    """A run's folder, the one lifecycle of every recipe run (sae_zoo's :func:`fit`, a peer library's in
    :mod:`sae_zoo.peers`): checked before any work (new, empty, or left by a run that did not finish), then ``config.yaml``
    at the start, and ``metrics.json`` (:func:`run_record`) once the run is evaluated. Only rank zero writes."""

    def __init__(self, cfg: DictConfig, recipe_name: str = "recipe", resume: bool = False) -> None:
        self.cfg, self.resume = cfg, resume
        self.path = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, recipe_name)
        self.rank_zero = rank_zero_only.rank == 0
        if self.rank_zero:
            check_run_dir(self.path)

    def start(self, config: DictConfig | dict[str, Any] | None = None) -> None:
        """Create the folder and write the resolved recipe (``config``, default the run's); a resumed run keeps
        the one it has."""
        if self.rank_zero and not self.resume:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(self.cfg if config is None else config))

    def agree(self, trainer: L.Trainer) -> None:
        """Every rank of a multi-device run takes rank zero's folder (a default name holds the start time, which
        the ranks read apart), by the strategy's own broadcast."""
        self.path = Path(trainer.strategy.broadcast(str(self.path), src=0))

    def finish(self, datamodule: SparseCodingData, model: SparseCoder, test: dict[str, Any], *,
               extra: dict[str, Any] | None = None, **record: Any) -> dict[str, Any]:
        """Write ``metrics.json`` (:func:`run_record` of ``test`` and ``record``, then ``extra``) and return it."""
        metrics = {**run_record(self.cfg, datamodule, model, test, **record), **(extra or {})}
        atomic_write_json(self.path / "metrics.json", metrics)
        return metrics


def fit(cfg: DictConfig, recipe_name: str = "recipe", progress: bool = True,
        resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train and evaluate the recipe's model; write the run directory. Returns ``(run_dir, metrics)``.

    The run directory holds ``config.yaml`` (the resolved recipe), ``model.ckpt`` (a Lightning
    checkpoint: ``SparseCoder.load_from_checkpoint``), ``logs/metrics.csv`` and ``metrics.json``.
    Everything is checked and built before anything is written, and a run directory without a
    checkpoint (a run that failed) may be reused. With several devices (``trainer.devices``,
    ``trainer.strategy``) every rank trains and rank zero evaluates and writes. ``checkpoint_every`` keeps
    ``checkpoint.ckpt`` in the run folder while it trains; ``resume=True`` goes on from it (see :func:`resume_recipe`).
    """
    run = RunFolder(cfg, recipe_name, resume=resume)
    checkpoint = run.path / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise RecipeError(f"--resume: {run.path} holds no {CHECKPOINT}: the run wrote none (set checkpoint_every) "
                          "or had not reached its first one")
    clt = is_clt_recipe(cfg)
    if clt:
        L.seed_everything(cfg.seed, verbose=False)
        with initialising(cfg.seed):  # as an SAE's run: the same recipe starts from the same weights
            datamodule, model = build_clt(cfg)
        trainer_kwargs, loggers = section_kwargs(cfg.trainer), recipe_loggers(cfg)
    else:
        p = plan(cfg)
        if p.hooks:
            recipes = hook_recipes(cfg, run.path)
            datamodule, models = _build_hooks(recipes)
        else:
            datamodule, model = build(p)
        trainer_kwargs, loggers = p, p.loggers
    callbacks = [TrainingClock(), *([PeriodicCheckpoint(run.path, cfg.checkpoint_every)] if cfg.checkpoint_every else [])]
    trainer = make_trainer(trainer_kwargs, progress=progress, root_dir=run.path, callbacks=callbacks,
                           logger=[CSVLogger(run.path, name="logs", version=""), *make_loggers(loggers, run.path)])
    run.start()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    try:
        if clt:
            return _train_and_evaluate_clt(run, trainer, datamodule, model, cfg, checkpoint if resume else None)
        if p.hooks:
            return _train_and_evaluate_hooks(run, trainer, datamodule, models, recipes, checkpoint if resume else None)
        return _train_and_evaluate(run, trainer, datamodule, model, checkpoint if resume else None)
    finally:
        torch.set_float32_matmul_precision(precision)


def resume_recipe(run_dir: str | Path, recipe: str | Path | None = None, overrides: Sequence[str] = (),
                  quick: bool = False) -> DictConfig:
    """The recipe of the run in ``run_dir`` (its ``config.yaml``), to resume it. Given a recipe file (and
    overrides), it must be that same recipe: a changed recipe would go on from a checkpoint of another run."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise RecipeError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
    if (run_dir / "model.ckpt").exists() or (run_dir / "metrics.json").exists():
        raise RecipeError(f"--resume: {run_dir} holds a finished run; there is nothing to resume")
    cfg = recipe_from_content(read_recipe_file(saved), source=str(saved))
    cfg.run_dir = str(run_dir)
    if recipe is not None or overrides:
        given = (load_recipe(recipe, overrides, quick=quick) if recipe is not None
                 else recipe_from_content(read_recipe_file(saved), overrides, source=str(saved)))
        given.run_dir = str(run_dir)
        ours, theirs = (_flat(OmegaConf.to_container(c, resolve=True)) for c in (cfg, given))
        changed = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
        if changed:
            detail = "; ".join(f"{k}: the run has {ours.get(k)!r}, now {theirs.get(k)!r}" for k in changed[:5])
            raise RecipeError(f"--resume: the recipe differs from the one {run_dir} was started with ({detail}); "
                              "resume it as it was, or start a new run")
    return cfg


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: value}``."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def hook_recipes(cfg: DictConfig, run_dir: Path) -> dict[str, DictConfig]:
    """Each hook's own recipe in a recipe with ``data.hooks``: the recipe with ``data.hook`` (and ``hook_out``) in
    place of the list (and ``data.cache_dir/<hook>`` for its held-out set), written to ``run_dir/<hook>``; each is
    what a run on that hook alone would be."""
    recipes = {}
    for hook, hook_out in check_hooks(OmegaConf.to_container(cfg.data.hooks)):
        one = cfg.copy()
        one.data = OmegaConf.create({k: v for k, v in cfg.data.items() if k != "hooks"})
        one.data.hook = hook
        if hook_out is not None:
            one.data.hook_out = hook_out
        name = hook_name([hook, hook_out] if hook_out else hook)
        if cfg.data.get("cache_dir"):  # each hook's held-out set and statistics in a folder of its own
            one.data.cache_dir = str(Path(cfg.data.cache_dir) / name)
        one.run_dir = str(run_dir / name)
        recipes[name] = one
    return recipes


def _build_hooks(recipes: dict[str, DictConfig]) -> tuple[MultiHookData, dict[str, SparseCoder]]:
    """The data of every hook of ``data.hooks`` (:class:`~sae_zoo.data.multi_hook.MultiHookData`) and each hook's
    model, built as its own recipe (:func:`hook_recipes`) would build it."""
    plans = {name: plan(one) for name, one in recipes.items()}
    data = MultiHookData({name: q.data_class(**q.data_kwargs) for name, q in plans.items()})
    data.check_hooks()  # every hook exists and is listed once, before any forward pass
    return data, {name: build(q, data.parts[name])[1] for name, q in plans.items()}


def _train_and_evaluate_hooks(run: RunFolder, trainer: L.Trainer, data: MultiHookData,
                              models: dict[str, SparseCoder], recipes: dict[str, DictConfig],
                              resume_from: Path | None) -> tuple[Path, dict[str, Any]]:
    """Train one model per hook from one LM pass (:class:`~sae_zoo.multihead.HeadBank`), then write and evaluate
    each as a run of its own in ``RUN_DIR/<hook>``."""
    if trainer.is_global_zero and trainer.world_size == 1:  # else the fit prepares it (see _train_and_evaluate)
        data.prepare_data()
    trainer.fit(HeadBank(models, reads={name: name for name in models}), datamodule=data, ckpt_path=resume_from)
    train_seconds = training_seconds(trainer)
    run.agree(trainer)
    if not trainer.is_global_zero:
        return run.path, {}
    folders, tests = {}, {}
    for name, model in models.items():
        one = RunFolder(recipes[name])
        one.start()
        part = data.parts[name]
        model.dictionary.provenance = {**part.describe(), **model.dictionary.provenance}
        _save_model_checkpoint(model, one.path / "model.ckpt", step=trainer.global_step)
        test = evaluate_run(model, part, ProbingConfig(**section_kwargs(recipes[name].probing)))
        tests[name] = one.finish(part, model, test, encoder=run.cfg.encoder.name, steps=trainer.global_step,
                                 train_seconds=train_seconds, devices=trainer.world_size)["test"]
        folders[name] = str(one.path)
    (run.path / CHECKPOINT).unlink(missing_ok=True)
    metrics = {"hooks": folders, "steps": trainer.global_step, "train_seconds": round(train_seconds, 3),
               "devices": trainer.world_size, "lm_contexts": data._live.lm_contexts if data._live else 0,
               "test": tests}
    atomic_write_json(run.path / "metrics.json", metrics)
    return run.path, metrics


def _train_and_evaluate_clt(run: RunFolder, trainer: L.Trainer, data: MultiHookData, clt: CrossLayerTranscoder,
                            cfg: DictConfig, resume_from: Path | None) -> tuple[Path, dict[str, Any]]:
    """Train a cross-layer transcoder from one LM pass over its layers (:mod:`sae_zoo.clt_recipe`), then write it
    (``RUN_DIR/model``) and its held-out figures (``metrics.json``)."""
    if trainer.is_global_zero and trainer.world_size == 1:
        data.prepare_data()
    trainer.fit(clt, datamodule=data, ckpt_path=resume_from)
    train_seconds = training_seconds(trainer)
    run.agree(trainer)
    if not trainer.is_global_zero:
        return run.path, {}
    describe_clt(clt, data)
    clt.save_pretrained(run.path / "model")
    test = evaluate_clt({"clt": clt}, data)["clt"]
    (run.path / CHECKPOINT).unlink(missing_ok=True)
    metrics = {"family": "clt", "layers": clt.layers, "encoder": cfg.encoder.name, "steps": trainer.global_step,
               "train_seconds": round(train_seconds, 3), "devices": trainer.world_size,
               "test": {k: v for k, v in test.items() if isinstance(v, (int, float))},
               "l0_per_layer": test["l0_per_layer"]}
    atomic_write_json(run.path / "metrics.json", metrics)
    return run.path, metrics


def training_seconds(trainer: L.Trainer) -> float:
    """The seconds the trainer's last fit trained (its :class:`~sae_zoo.clock.TrainingClock`)."""
    return next(c.seconds for c in trainer.callbacks if isinstance(c, TrainingClock))


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be new, empty, or left by a run that did not finish: one that wrote neither a
    checkpoint nor ``metrics.json`` (a run trained by another library writes only the latter)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run_dir: {run_dir} exists and is not a folder; choose another run_dir")
    if (run_dir / "model.ckpt").exists() or (run_dir / "metrics.json").exists():
        raise RecipeError(f"run_dir: {run_dir} already exists and holds a finished run; choose another run_dir")


def _train_and_evaluate(run: RunFolder, trainer: L.Trainer, datamodule: SparseCodingData,
                        model: SparseCoder, resume_from: Path | None = None) -> tuple[Path, dict[str, Any]]:
    cfg = run.cfg
    if trainer.is_global_zero and trainer.world_size == 1:
        # e.g. collect activations, so that train_seconds counts training only (under DDP the fit prepares the data:
        # every rank then runs the LM on its share)
        datamodule.prepare_data()
    trained = any(p.requires_grad for p in model.parameters())
    if trained:
        trainer.fit(torch.compile(model) if cfg.compile else model, datamodule=datamodule, ckpt_path=resume_from)
    # else: a pure inference head (e.g. FISTA) on a frozen dictionary has nothing to train
    train_seconds = training_seconds(trainer) if trained else 0.0
    if trained:
        run.agree(trainer)
    run_dir = run.path
    model.dictionary.provenance = {**datamodule.describe(), **model.dictionary.provenance}
    partial = run_dir / ".model.ckpt.partial"
    if trained:  # saving is collective (rank zero writes)
        trainer.save_checkpoint(partial, weights_only=False)
    if not trainer.is_global_zero:
        return run_dir, {}
    if not trained:
        _save_model_checkpoint(model, partial)
    test = evaluate_run(model, datamodule, ProbingConfig(**section_kwargs(cfg.probing)))
    os.replace(partial, run_dir / "model.ckpt")
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the finished run's model.ckpt supersedes it
    return run_dir, run.finish(datamodule, model, test, encoder=cfg.encoder.name, steps=trainer.global_step,
                               train_seconds=train_seconds, devices=trainer.world_size)


def evaluate_run(model: SparseCoder, datamodule: SparseCodingData,
                 probing: ProbingConfig | None = None) -> dict[str, Any]:
    """Every held-out figure a run reports: :func:`~sae_zoo.evaluation.evaluate`'s, then the downstream ones,
    from one pass of the model over the held-out data."""
    return evaluate_model(model, datamodule, probing).figures()


def run_record(cfg: DictConfig, datamodule: SparseCodingData, model: SparseCoder, test: dict[str, Any], *,
               encoder: str, steps: int, train_seconds: float, devices: int) -> dict[str, Any]:
    """A run's ``metrics.json``: what ran, how long it trained, its inference FLOPs and its held-out figures
    (and, for a run that targets an L0, ``l0_calibration``: the L0 training reached and the final shift)."""
    record = {"setting": cfg.setting, "encoder": encoder, "seed": cfg.seed, "data_seed": datamodule.hparams.get("seed"),
              "steps": steps, "train_seconds": round(train_seconds, 3), "devices": devices,
              "inference_flops": flops.inference_flops(model.encoder), "test": dict(sorted(test.items()))}
    if getattr(model, "l0_calibration", None):
        record["l0_calibration"] = model.l0_calibration
    return record


def _save_model_checkpoint(model: SparseCoder, path: Path, step: int = 0) -> None:
    """The Lightning checkpoint of a model that was not its trainer's own (one that never trained; one of a bank's),
    which Lightning saves only for what a fit attached."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": L.__version__, "epoch": 0, "global_step": step}
    model.on_save_checkpoint(checkpoint)
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
