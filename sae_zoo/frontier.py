"""The compute frontier: test MCC against total FLOPs (training + inference) for every method.

A frontier recipe (``recipes/synthetic/frontier.yaml``) lists, per panel (a setting, optionally
with its own data), methods: an encoder head, the training steps at which to evaluate it
(amortised heads train once and are scored after each), and optionally a ``sweep`` of one head
argument (an iterative head's ``steps``). Every (method, budget, seed) point is planned, built,
trained (with the recipe's Trainer, on any accelerator) and evaluated
(:func:`sae_zoo.evaluation.evaluate`) exactly as ``sae-zoo fit`` does; FLOPs come from
:mod:`sae_zoo.flops`. ``--quick`` merges the ``quick:`` preset over the recipe, as for every recipe
(a panel set to ``null`` there is dropped). Outputs: ``frontier.csv``, ``frontier.png``
and ``report.md`` (each method's best figure beside the paper's).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from . import flops
from ._io import atomic_write_text
from .evaluation import evaluate
from .recipe import RecipeError, apply_quick, build, make_trainer, plan, read_recipe_file, recipe_from_content
from .report import format_table, plot_frontier, write_csv

log = logging.getLogger(__name__)

COLUMNS = ["panel", "setting", "method", "seed", "budget", "train_steps", "train_flops", "inference_flops", "total_flops",
           "mcc", "dictionary_mcc", "fvu", "l0"]


class _ScoreAt(L.Callback):
    """Scores the model on the test split after each of the given global steps."""

    def __init__(self, steps: list[int], score) -> None:
        self.steps, self.score, self.rows = set(steps), score, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self.rows.append(self.score(trainer.global_step))


def load_frontier(path: str | Path, quick: bool = False) -> dict[str, Any]:
    spec = apply_quick(read_recipe_file(path), quick, str(path))
    if not isinstance(spec.get("settings"), dict):
        raise RecipeError(f"{path}: a frontier recipe needs a 'settings' mapping")
    return spec


def _score(model, datamodule) -> dict[str, float]:
    scores = evaluate(model, datamodule)
    return {"mcc": scores["mcc"], "fvu": scores["fvu"], "l0": scores["l0"],
            "dictionary_mcc": scores.get("dictionary_mcc", float("nan"))}


def panels(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], list[dict[str, Any]]]]:
    """``(panel, setting, data, methods)`` for each entry of ``settings``: either ``name: [methods]``
    (the setting is the name, the data the recipe's) or ``name: {setting, data, methods}``, whose
    ``data`` overrides the recipe's (e.g. the scaling sweep's M, N, K)."""
    out = []
    for name, entry in spec["settings"].items():
        if entry is None:  # dropped by a quick preset
            continue
        if isinstance(entry, list):
            out.append((name, name, dict(spec.get("data", {})), entry))
        else:
            out.append((name, entry.get("setting", name), {**spec.get("data", {}), **entry.get("data", {})},
                        entry["methods"]))
    return out


def run_point(panel: str, data: dict, setting: str, encoder: dict, seed: int, train_steps: list[int],
              model_kwargs: dict, method: str, budget_of, trainer_kwargs: dict | None = None) -> list[dict[str, Any]]:
    """Train one (method, seed) and score it after each of ``train_steps`` (or once, untrained)."""
    cfg = recipe_from_content({"setting": setting, "seed": seed, "data": {"name": "synthetic", **data},
                               "encoder": encoder, "model": model_kwargs, "trainer": trainer_kwargs},
                              source=f"frontier method {method!r}")
    p = plan(cfg)
    datamodule, model = build(p)
    learn_dictionary = setting == "unknown"
    n_train, n_test = len(datamodule.train_x), len(datamodule.test_x)

    def row(steps: int) -> dict[str, Any]:
        scores = _score(model, datamodule)
        train = n_train * steps * flops.training_step_flops(model.encoder, learn_dictionary)
        inference = n_test * flops.inference_flops(model.encoder)
        return {"panel": panel, "setting": setting, "method": method, "seed": seed, "budget": budget_of(steps),
                "train_steps": steps, "train_flops": train, "inference_flops": inference,
                "total_flops": train + inference, **scores}

    if not train_steps or not any(p.requires_grad for p in model.parameters()):
        return [row(0)]
    scorer = _ScoreAt(train_steps, row)
    trainer = make_trainer(p, callbacks=[scorer], progress=False, max_steps=max(train_steps), limit_val_batches=0,
                           num_sanity_val_steps=0)
    trainer.fit(model, datamodule)
    return scorer.rows


def run_frontier(spec: dict[str, Any], progress: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seeds, model_kwargs, trainer_kwargs = spec.get("seeds", [20240625]), spec.get("model", {}), spec.get("trainer", {})
    points = [(panel, setting, data, method, seed) for panel, setting, data, methods in panels(spec)
              for method in methods for seed in seeds]
    start = time.perf_counter()
    for i, (panel, setting, data, method, seed) in enumerate(points, 1):
        label, encoder = method["label"], dict(method["encoder"])
        train_steps = list(method.get("train_steps", []))
        sweep = method.get("sweep")
        if sweep:
            (key, values), = sweep.items()
            for value in values:
                rows += run_point(panel, data, setting, {**encoder, key: value}, seed, train_steps, model_kwargs,
                                  label, lambda steps, value=value: value, trainer_kwargs)
        else:
            rows += run_point(panel, data, setting, encoder, seed, train_steps, model_kwargs, label,
                              lambda steps: steps, trainer_kwargs)
        if progress:
            best = max(r["mcc"] for r in rows if r["method"] == label and r["panel"] == panel)
            log.info("[%d/%d %6.0fs] %-16s %-22s seed %s: best MCC so far %.4f", i, len(points),
                     time.perf_counter() - start, panel, label, seed, best)
    return rows


def summarise(rows: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per panel and method: mean/std over seeds of the MCC at each budget, and the best budget."""
    out: dict[str, list[dict[str, Any]]] = {}
    for panel, _, _, methods in panels(spec):
        out[panel] = []
        for method in methods:
            mine = [r for r in rows if r["panel"] == panel and r["method"] == method["label"]]
            budgets = sorted({r["budget"] for r in mine})
            curve = []
            for budget in budgets:
                at = [r for r in mine if r["budget"] == budget]
                curve.append({"budget": budget, "flops": float(np.mean([r["total_flops"] for r in at])),
                              "mcc": float(np.mean([r["mcc"] for r in at])), "std": float(np.std([r["mcc"] for r in at])),
                              "dictionary_mcc": float(np.mean([r["dictionary_mcc"] for r in at]))})
            best = max(curve, key=lambda c: c["mcc"])
            last = curve[-1]
            out[panel].append({"label": method["label"], "paper": method.get("paper"), "curve": curve,
                               "best": best, "last": last, "seeds": len({r["seed"] for r in mine})})
    return out


def write_report(summary: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    lines = [f"# {title}", "",
             "Test MCC (mean +- std over seeds) against total FLOPs (training + inference on the test set).",
             "'MCC at largest budget' is at the method's largest budget (the paper's setting where the paper "
             "gives a figure); 'best MCC' is at its best budget.", ""]
    header = ["method", "MCC at largest budget", "paper", "total FLOPs", "best MCC", "at FLOPs", "seeds"]
    for panel, methods in summary.items():
        rows = []
        for m in methods:
            last, best = m["last"], m["best"]
            extra = f" (dict. MCC {last['dictionary_mcc']:.3f})" if not np.isnan(last["dictionary_mcc"]) else ""
            rows.append([m["label"], f"{last['mcc']:.3f} +- {last['std']:.3f}{extra}",
                         "-" if m["paper"] is None else str(m["paper"]), f"{last['flops']:.2e}",
                         f"{best['mcc']:.4f}", f"{best['flops']:.2e}", str(m["seeds"])])
        lines += [f"## {panel.replace('_', ' ')}", "", format_table(rows, header, markdown=True), ""]
    atomic_write_text(path, "\n".join(lines))


def frontier(recipe: str | Path, out_dir: str | Path | None = None, quick: bool = False,
             progress: bool = True, seeds: list[int] | None = None) -> Path:
    """Run a frontier recipe and write ``frontier.csv``, ``frontier.png`` and ``report.md``; returns the folder.
    ``seeds`` replaces the recipe's model seeds."""
    spec = load_frontier(recipe, quick)
    if seeds:
        spec["seeds"] = list(seeds)
    out = Path(out_dir or spec.get("out_dir") or Path("runs") / ("frontier-quick" if quick else "frontier"))
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out} already exists and is not empty; pass another --out")
    rows = run_frontier(spec, progress)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, spec)
    write_csv(rows, out / "frontier.csv", COLUMNS)
    plot_frontier(summary, out / "frontier.png")
    write_report(summary, out / "report.md", spec.get("title", "Compute frontier"))
    return out


__all__ = ["frontier", "run_frontier", "summarise", "load_frontier"]
