"""Suites: several runs from one recipe file, compared in one table and plot.

A suite recipe has ``base`` (a recipe every run starts from), ``runs`` (a list of ``{name, label,
recipe}``) and optionally ``title`` and ``quick`` (keys replaced under ``--quick``). A run's
``recipe`` replaces the base's ``encoder`` and ``dictionary`` sections whole (heads take different
arguments) and merges into the others. A string ``run:NAME`` anywhere in it becomes the directory of
the earlier run ``NAME``: ``dictionary: {pretrained: run:sae}`` puts a head in front of that SAE's
frozen decoder, ``warm_start: {pretrained: run:sae}`` seeds an iterative head with its encoder.
``sae-zoo fit SUITE.yaml [--quick] [key=value ...]`` runs them in order (overrides apply to every
run) and writes ``comparison.csv``, ``comparison.md`` and ``comparison.png`` beside the run directories.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ._io import atomic_write_text
from .recipe import RecipeError, apply_quick, fit, read_recipe_file, recipe_from_content
from .report import format_table, plot_comparison, print_table, write_csv

REPLACED_SECTIONS = ("encoder", "dictionary")
RUN_REFERENCE = "run:"
#: comparison columns: (metrics.json test key, header, format); a key's standard error, ``KEY_se``, is shown
#: beside it when the run reports one
COLUMNS = [("fvu", "FVU", "{:.4f}"), ("fvu_with_outliers", "FVU, all tokens", "{:.4f}"), ("l0", "L0", "{:.1f}"),
           ("dead_latents", "dead", "{:.3f}"), ("ce_loss_recovered", "CE recovered", "{:.3f}"),
           ("ce_spliced", "CE spliced", "{:.3f}"), ("mcc", "MCC", "{:.3f}")]


def is_suite(path: str | Path) -> bool:
    return "runs" in read_recipe_file(path)


def _merge_run(base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    merged = OmegaConf.to_container(OmegaConf.merge({k: v for k, v in base.items() if k not in run
                                                     or k not in REPLACED_SECTIONS},
                                                    {k: v for k, v in run.items() if k not in REPLACED_SECTIONS}))
    merged.update({k: v for k, v in run.items() if k in REPLACED_SECTIONS})
    return merged


def _resolve_references(value: Any, run_dirs: dict[str, Path], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_references(v, run_dirs, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_references(v, run_dirs, where) for v in value]
    if isinstance(value, str) and value.startswith(RUN_REFERENCE):
        name = value[len(RUN_REFERENCE):]
        if name not in run_dirs:
            raise RecipeError(f"{where}: {value!r} names no earlier run (earlier: {', '.join(run_dirs) or 'none'})")
        return str(run_dirs[name])
    return value


def run_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, quick: bool = False,
              out_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Run every run of the suite at ``path``; returns ``(output folder, one row of results per run)``."""
    source = str(path)
    content = apply_quick(read_recipe_file(path), quick, source)
    runs, base = content.get("runs"), content.get("base", {})
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) and "name" in r for r in runs):
        raise RecipeError(f"{source}: 'runs' must be a list of {{name, label, recipe}} mappings")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else Path("runs") / f"{Path(path).stem}{'-quick' if quick else ''}-{stamp}"
    # check every run's recipe before the first one trains (earlier runs' folders are not known yet)
    planned = {r["name"]: out / r["name"] for r in runs}
    recipes = []
    for spec in runs:
        where = f"{source}: runs[{spec['name']}]"
        content_ = _resolve_references(_merge_run(base, spec.get("recipe", {})), planned, where)
        recipes.append(recipe_from_content({**content_, "run_dir": str(planned[spec["name"]])}, overrides, where))
    rows = []
    for spec, cfg in zip(runs, recipes):
        label = spec.get("label", spec["name"])
        print(f"\n== {label} ==", flush=True)
        run_dir, metrics = fit(cfg, recipe_name=Path(path).stem, progress=progress)
        batch = cfg.data.get("batch_size")
        speed = metrics["steps"] * batch / metrics["train_seconds"] if batch and metrics["train_seconds"] else None
        rows.append({"name": spec["name"], "label": label, "run_dir": str(run_dir), "steps": metrics["steps"],
                     "train_seconds": metrics["train_seconds"], "train_tokens_per_s": speed, **metrics["test"]})
    write_comparison(out, content.get("title", Path(path).stem), rows)
    return out, rows


def comparison_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the comparison: the metrics any run reported, training time and speed."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    header = ["method", *(h for _, h, _ in columns), "train s", "train tok/s"]
    body = [[r["label"], *(_cell(r, k, f) for k, _, f in columns), f"{r['train_seconds']:.0f}",
             f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "-"] for r in rows]
    return header, body


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key not in row:
        return "-"
    se = row.get(f"{key}_se")
    return fmt.format(row[key]) + (f" ± {fmt.format(se)}" if se is not None and se == se else "")


def comparison_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What a reader needs beside the table: the outlier tokens left out, the standard errors' source, and
    whether the methods sit at different L0s."""
    notes = []
    counted = next((r for r in rows if "outlier_tokens" in r), None)
    if counted is not None:
        notes.append(f"{counted['outlier_tokens']} of {counted['held_out_tokens']} held-out tokens are outliers "
                     f"(norm above {counted.get('outlier_norm', float('nan')):.4g}, a multiple of the median) and "
                     "are left out of FVU, L0, dead and CE recovered; 'FVU, all tokens' keeps them.")
    if any(f"{k}_se" in r for r in rows for k, _, _ in COLUMNS):
        notes.append("± is one standard error, by bootstrap over held-out contexts.")
    l0s = [r["l0"] for r in rows if "l0" in r]
    if len(l0s) > 1 and max(l0s) > 1.1 * min(l0s):
        notes.append(f"The methods sit at different L0s ({min(l0s):.1f} to {max(l0s):.1f}): rank only rows at "
                     "matching L0.")
    return notes


def write_comparison(out: Path, title: str, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header, body = comparison_table(rows)
    write_csv(rows, out / "comparison.csv")
    notes = "".join(f"\n{line}\n" for line in comparison_notes(rows))
    atomic_write_text(out / "comparison.md", f"# {title}\n\n{format_table(body, header, markdown=True)}\n{notes}")
    plot_comparison(rows, out / "comparison.png", title)


def print_comparison(out: Path, rows: list[dict[str, Any]]) -> None:
    header, body = comparison_table(rows)
    print()
    print_table(body, header)
    for line in comparison_notes(rows):
        print(line)
    print(f"\nruns, comparison.csv/.md and comparison.png: {out}")
