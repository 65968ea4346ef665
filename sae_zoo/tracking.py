"""Experiment trackers beside a run's CSV log: a recipe's ``loggers`` (Lightning's own loggers, by name).

``loggers: [tensorboard, {wandb: {project: saes, mode: offline}}]`` logs every run of the recipe to TensorBoard
(event files in ``RUN_DIR/logs``, beside ``metrics.csv``) and to Weights & Biases (files in ``RUN_DIR/wandb``).
Each entry is a name or ``{name: {options}}``, the options being the Lightning logger's own arguments, checked
like every other key of a recipe.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

from ._signature import UnknownArgumentError, check_kwargs, keyword_parameters

def _summary_writer() -> Any:
    try:  # Lightning's TensorBoardLogger writes with torch's SummaryWriter where tensorboard is installed
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter.__init__


def _wandb_init() -> Any:
    import wandb
    return wandb.init


#: name -> (the Lightning logger class, the packages it can write with, its arguments that put it in a run
#: directory, and what it passes its other options to)
LOGGERS: dict[str, tuple[str, tuple[str, ...], Callable[[Path], dict[str, Any]], Callable[[], Any] | None]] = {
    "tensorboard": ("TensorBoardLogger", ("tensorboard", "tensorboardX"),
                    lambda run_dir: {"save_dir": str(run_dir), "name": "logs", "version": ""}, _summary_writer),
    "wandb": ("WandbLogger", ("wandb",), lambda run_dir: {"save_dir": str(run_dir)}, _wandb_init),
    "mlflow": ("MLFlowLogger", ("mlflow",), lambda run_dir: {"save_dir": str(Path(run_dir) / "mlruns")}, None),
}


def _logger_class(name: str) -> type:
    return getattr(importlib.import_module("lightning.pytorch.loggers"), LOGGERS[name][0])


def _check_options(name: str, options: dict[str, Any], where: str) -> None:
    """The logger's own arguments (and those it passes on: SummaryWriter's, ``wandb.init``'s), by name and type."""
    cls, (_, _, in_run_dir, forwards_to) = _logger_class(name), LOGGERS[name]
    own = keyword_parameters(cls.__init__)
    passed_on = keyword_parameters(forwards_to()) if forwards_to is not None else {}
    prefix = f"{where}.{name}."
    unknown = sorted(set(options) - set(own) - set(passed_on))
    if unknown:
        raise UnknownArgumentError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} for the {name} logger; "
                                   f"valid: {', '.join(sorted(set(own) | set(passed_on)))}",
                                   [prefix + k for k in unknown])
    check_kwargs(cls.__init__, {**in_run_dir(Path(".")), **{k: v for k, v in options.items() if k in own}},
                 what=f"the {name} logger", key_prefix=prefix)
    if passed_on:
        check_kwargs(forwards_to(), {k: v for k, v in options.items() if k not in own}, what=f"the {name} logger",
                     key_prefix=prefix)


def logger_specs(entries: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, options)]`` from a recipe's ``loggers``; a ``ValueError`` names the entry at fault (``loggers[i]``):
    a name that is not a logger, an option the logger does not take, or a package it needs that is missing."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"loggers: a list of logger names or {{name: {{options}}}}, got {entries!r}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"loggers[{i}]"
        if isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            options = dict(options or {})
        elif isinstance(entry, str):
            name, options = entry, {}
        else:
            raise ValueError(f"{where}: a logger name or {{name: {{options}}}}, got {entry!r}")
        if name not in LOGGERS:
            raise ValueError(f"{where}: unknown logger {name!r}; choices: {', '.join(sorted(LOGGERS))} (every run "
                             "also writes logs/metrics.csv)")
        packages = LOGGERS[name][1]
        if not any(importlib.util.find_spec(package) for package in packages):
            raise ValueError(f"{where}: the {name} logger needs the {' or '.join(packages)} package "
                             f"(pip install {packages[0]})")
        _check_options(name, options, where)
        specs.append((name, options))
    return specs


def make_loggers(specs: list[tuple[str, dict[str, Any]]], run_dir: Path) -> list[Any]:
    """The loggers of :func:`logger_specs`, writing under ``run_dir`` unless their options say where."""
    return [_logger_class(name)(**{**LOGGERS[name][2](run_dir), **options}) for name, options in specs]
