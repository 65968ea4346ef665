"""Suites: several runs from one recipe file, compared in one table and plot.

A suite recipe has ``base`` (a recipe every run starts from), ``runs`` (a list of ``{name, label,
recipe}``) and optionally ``title`` and ``quick`` (keys replaced under ``--quick``). A run's
``recipe`` replaces the base's ``encoder`` and ``dictionary`` sections whole (heads take different
arguments) and merges into the others. A string ``run:NAME`` anywhere in it becomes the directory of
the earlier run ``NAME``: ``dictionary: {pretrained: run:sae}`` puts a head in front of that SAE's
frozen decoder, ``warm_start: {pretrained: run:sae}`` seeds an iterative head with its encoder;
``run:NAME/PATH`` is a path inside that run (``run:theirs/saelens``: a SAELens run's saved SAE).
``sae-zoo fit SUITE.yaml [--quick] [key=value ...]`` runs them in order (overrides apply to every
run) and writes ``comparison.csv``, ``comparison.md`` and ``comparison.png`` beside the run directories.

``seeds: [s1, s2, ...]`` repeats every run once per model seed (``NAME/seedS``; ``run:NAME`` then means
the same seed's run) and the table gives each method's mean +- standard deviation over the seeds.
A run with ``saelens: {architecture: ..., ...}`` is trained by SAELens's own trainer on the same data
(:mod:`sae_zoo.peers`). A run may carry ``published: {metric: value}``, figures the literature reports
for that method, shown beside ours in ``report.md``, and ``curve: NAME``: the runs of one curve (a method at
several L0s, say) are joined by a line in ``comparison.png``. Where the data know the true features, the table
gives F1, decoder MCC, uniqueness, variance explained and L0, ``comparison.png`` plots F1 and MCC against
L0 and against inference FLOPs, and ``report.md`` compares the best sae_zoo method with SAELens's best.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from ._io import atomic_write_text
from .evals import EvalSettings, evaluate_source, parse_evals
from .peers import fit_saelens
from .recipe import RecipeError, apply_quick, fit, read_recipe_file, recipe_from_content
from .report import format_table, plot_comparison, plot_recovery, write_csv

log = logging.getLogger(__name__)

REPLACED_SECTIONS = ("encoder", "dictionary")
RUN_REFERENCE = "run:"
#: comparison columns: (metrics.json test key, header, format); a key's standard error, ``KEY_se``, is shown
#: beside it when the run reports one
COLUMNS = [("latent_f1", "F1", "{:.3f}"), ("dictionary_mcc", "MCC (decoder)", "{:.3f}"),
           ("uniqueness", "unique", "{:.3f}"),
           ("ve", "VE", "{:.3f}"), ("fvu", "FVU", "{:.4f}"), ("fvu_with_outliers", "FVU, all tokens", "{:.4f}"),
           ("l0", "L0", "{:.1f}"), ("l0_controller", "L0 before the final shift", "{:.1f}"),
           ("dead_latents", "dead", "{:.3f}"), ("ce_loss_recovered", "CE recovered", "{:.3f}"),
           ("ce_loss_recovered_vs_mean", "CE recovered (vs mean)", "{:.3f}"),
           ("ce_spliced", "CE spliced", "{:.3f}"), ("mcc", "MCC (codes)", "{:.3f}"),
           ("probe_k1", "probe k=1", "{:.3f}"), ("probe_k5", "probe k=5", "{:.3f}"),
           ("probe_k20", "probe k=20", "{:.3f}"),
           ("inference_flops", "inference FLOPs", "{:.2e}")]
#: numbers averaged over seeds (the rest of a row is the first seed's); a method's FLOPs do not vary, so no spread
AVERAGED = [key for key, _, _ in COLUMNS] + ["train_seconds", "train_tokens_per_s"]
WITHOUT_SPREAD = ("inference_flops", "train_seconds", "train_tokens_per_s")


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
        name, _, inside = value[len(RUN_REFERENCE):].partition("/")
        if name not in run_dirs:
            raise RecipeError(f"{where}: {value!r} names no earlier run (earlier: {', '.join(run_dirs) or 'none'})")
        return str(run_dirs[name] / inside) if inside else str(run_dirs[name])
    return value


def run_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, quick: bool = False,
              out_dir: str | Path | None = None, progress: bool = True, evals: tuple[str, ...] = (),
              eval_settings: EvalSettings | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Run every run of the suite at ``path`` (once per seed); returns ``(output folder, one row per method)``. The
    output folder is ``out_dir``, else a ``run_dir=PATH`` override (each run writes ``PATH/NAME``), else a new
    folder under ``runs/``. ``evals`` (on language-model data): named evals of every run, each written into its
    folder (``sae-zoo evaluate``'s files) and compared in ``evaluations.md``."""
    source = str(path)
    named = [o for o in overrides if o.startswith("run_dir=")]
    overrides = [o for o in overrides if not o.startswith("run_dir=")]
    out_dir = out_dir or (named[-1].partition("=")[2] if named else None)
    content = apply_quick(read_recipe_file(path), quick, source)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else Path("runs") / f"{Path(path).stem}{'-quick' if quick else ''}-{stamp}"
    jobs = suite_jobs(content, source, out, overrides)
    runs = content["runs"]
    if evals:
        evals = parse_evals(evals)
        not_lm = sorted({spec["name"] for spec, cfg, _ in jobs if cfg.data.name != "activations"})
        if not_lm:
            raise ValueError(f"--evals {','.join(evals)}: the runs {', '.join(not_lm)} do not train on a language "
                             "model's activations (data.name: activations), which the evals read")
        eval_settings = eval_settings or (EvalSettings.quick() if quick else EvalSettings())
    rows, decoders, start = [], [], time.perf_counter()
    for i, (spec, cfg, where) in enumerate(jobs, 1):
        label = spec.get("label", spec["name"])
        log.info("\n== [%d/%d, %.0fs] %s (seed %s) ==", i, len(jobs), time.perf_counter() - start, label, cfg.seed)
        if "saelens" in spec:
            run_dir, metrics = fit_saelens(cfg, dict(spec["saelens"]), recipe_name=Path(path).stem, where=where)
        else:
            run_dir, metrics = fit(cfg, recipe_name=Path(path).stem, progress=progress)
        batch = cfg.data.get("batch_size")
        speed = metrics["steps"] * batch / metrics["train_seconds"] if batch and metrics["train_seconds"] else None
        test = dict(metrics["test"])
        if "latent_f1" in test:  # variance explained, as SynthSAEBench reports it
            test["ve"] = 1 - test["fvu"]
        if metrics.get("l0_calibration"):  # a target_l0 run: where its controller got before the final shift
            test["l0_controller"] = metrics["l0_calibration"]["l0_before"]
        rows.append({"name": spec["name"], "label": label, "run_dir": str(run_dir), "seed": cfg.seed,
                     "steps": metrics["steps"], "train_seconds": metrics["train_seconds"], "train_tokens_per_s": speed,
                     "inference_flops": metrics.get("inference_flops"), "peer": "saelens" in spec, **test})
        pretrained = (cfg.get("dictionary") or {}).get("pretrained")  # a head on an earlier run's frozen decoder
        decoders.append(str(Path(pretrained).resolve()) if pretrained else str(Path(run_dir).resolve()))
    methods = aggregate(rows, runs)
    write_comparison(out, content.get("title", Path(path).stem), methods,
                     per_seed=rows if content.get("seeds") else None)
    if evals:
        evaluate_runs(out, rows, decoders, evals, eval_settings, progress)
    return out, methods


#: the figures of each eval that ``evaluations.md`` compares: (eval, figure, column)
EVAL_COLUMNS = [("core", "kl_div_score", "KL score"), ("core", "ce_loss_recovered", "CE recovered"),
                ("probing", "probe_k1", "1-sparse probing"),
                ("absorption", "mean_absorption_fraction_score", "absorption fraction"),
                ("absorption", "mean_full_absorption_score", "full absorption"),
                ("autointerp", "autointerp_detection", "detection"), ("autointerp", "autointerp_fuzzing", "fuzzing")]


def evaluate_runs(out: Path, rows: list[dict[str, Any]], decoders: list[str], evals: tuple[str, ...],
                  settings: EvalSettings, progress: bool) -> Path:
    """The named evals of every run (``evaluation.json`` and ``evaluation.md`` in its folder) and ``evaluations.md``
    beside them: a figure of each eval per run. ``decoders``: each run's decoder (its own folder, or the run whose
    frozen decoder it encodes for); runs on one decoder are scored by autointerp on the same latents, those drawn
    for the first of them (unless ``settings.latents`` names them). A peer library's run is listed, not evaluated."""
    drawn: dict[str, list[int]] = {}
    table = []
    for row, decoder in zip(rows, decoders):
        if row["peer"]:
            table.append([row["label"], *(["not evaluated (a peer library's run)"] * len(eval_columns(evals)))])
            continue
        log.info("\n== evals %s of %s ==", ",".join(evals), row["label"])
        run_settings = dataclasses.replace(settings, latents=settings.latents or drawn.get(decoder))
        record = json.loads((evaluate_source(row["run_dir"], evals, settings=run_settings, progress=progress)
                             / "evaluation.json").read_text())
        figures = record["figures"]
        settings.gate = run_settings.gate  # one judge, one gate
        settings.judge = run_settings.judge
        if "autointerp" in figures:
            drawn.setdefault(decoder, [r["latent"] for r in figures["autointerp"]["autointerp_per_latent"]])
        cells = []
        for name, key, _ in eval_columns(evals):
            value, se = figures[name].get(key), figures[name].get(f"{key}_se")
            hidden = name == "autointerp" and not figures[name]["autointerp_informative"]
            cells.append("uninformative" if hidden else "-" if value is None else
                         f"{value:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
        table.append([row["label"], *cells])
    header = ["run", *(column for _, _, column in eval_columns(evals))]
    text = (f"# Evaluations: {', '.join(evals)}\n\nEach run's own `evaluation.md` gives every figure; "
            "\"uninformative\": the autointerp judge failed its gate, so its scores are not shown. Runs on one "
            "decoder are scored by autointerp on the same latents.\n\n"
            + format_table(table, header, markdown=True) + "\n")
    return atomic_write_text(out / "evaluations.md", text)


def eval_columns(evals: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [column for column in EVAL_COLUMNS if column[0] in evals]


def suite_jobs(content: dict[str, Any], source: str, out: Path, overrides: list[str] | tuple[str, ...] = ()
               ) -> list[tuple[dict[str, Any], Any, str]]:
    """Every ``(run spec, resolved recipe, where)`` of a suite's content (its quick preset applied), in the
    order they run, each recipe checked before anything trains (earlier runs' folders are not known yet:
    ``run:NAME`` resolves to where they will be)."""
    runs, base = content.get("runs"), content.get("base", {})
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) and "name" in r for r in runs):
        raise RecipeError(f"{source}: 'runs' must be a list of {{name, label, recipe}} mappings")
    seeds = content.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise RecipeError(f"{source}: seeds must be a list of integers, got {seeds!r}")
    jobs = []
    for seed in seeds or [None]:
        planned = {r["name"]: out / r["name"] / (f"seed{seed}" if seed is not None else "") for r in runs}
        for spec in runs:
            where = f"{source}: runs[{spec['name']}]"
            content_ = _resolve_references(_merge_run(base, spec.get("recipe", {})), planned, where)
            extra = {"seed": seed} if seed is not None else {}
            cfg = recipe_from_content({**content_, **extra, "run_dir": str(planned[spec["name"]])}, overrides, where)
            jobs.append((spec, cfg, where))
    return jobs


def aggregate(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run of the suite: the mean over its seeds of every averaged number, ``KEY_sd`` their
    standard deviation (with two seeds or more), ``seeds`` how many, ``published`` the literature's figures."""
    out = []
    for spec in runs:
        mine = [r for r in rows if r["name"] == spec["name"]]
        row = {k: v for k, v in mine[0].items() if k != "seed"}
        row["seeds"] = len(mine)
        for key in AVERAGED:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if len(values) == len(mine) and values:
                row[key] = float(np.mean(values))
                if len(mine) > 1 and key not in WITHOUT_SPREAD:
                    row[f"{key}_sd"] = float(np.std(values, ddof=1))
        if spec.get("published"):
            row["published"] = dict(spec["published"])
        if spec.get("curve"):
            row["curve"] = str(spec["curve"])
        out.append(row)
    return out


def comparison_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the comparison: the metrics any run reported, training time and speed.
    Where the data know the truth (F1 is reported), variance explained replaces FVU."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    if any("ve" in r for r in rows):
        columns = [c for c in columns if c[0] != "fvu"]
    header = ["method", *(h for _, h, _ in columns), "train s", "train tok/s"]
    body = [[r["label"], *(_cell(r, k, f) for k, _, f in columns), f"{r['train_seconds']:.0f}",
             f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "-"] for r in rows]
    return header, body


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if row.get(key) is None:
        return "-"
    spread = row.get(f"{key}_se", row.get(f"{key}_sd"))
    return fmt.format(row[key]) + (f" ± {fmt.format(spread)}" if spread is not None and spread == spread else "")


def _by_value(rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], Any]) -> dict[Any, list[str]]:
    """The rows' labels grouped by ``value(row)`` (rows where it is None left out), in the rows' order."""
    groups: dict[Any, list[str]] = {}
    for row in rows:
        if value(row) is not None:
            groups.setdefault(value(row), []).append(row["label"])
    return groups


def comparison_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What a reader needs beside the table: the outlier tokens left out, the standard errors' source, and
    whether the methods sit at different L0s."""
    notes = []
    counts = _by_value(rows, lambda r: (r["outlier_tokens"], r["held_out_tokens"]) if "outlier_tokens" in r else None)
    if len(counts) == 1:
        (outliers, held_out), _ = next(iter(counts.items()))
        counted = next(r for r in rows if "outlier_tokens" in r)
        notes.append(f"{outliers} of {held_out} held-out tokens are outliers "
                     f"(norm above {counted.get('outlier_norm', float('nan')):.4g}, a multiple of the median) and "
                     "are left out of FVU, L0, dead and CE recovered; 'FVU, all tokens' keeps them.")
    elif counts:  # rows that read other hooks have other outliers
        notes.append("Outlier tokens (norm above a multiple of the median) are left out of FVU, L0, dead and CE "
                     "recovered; 'FVU, all tokens' keeps them. They are "
                     + "; ".join(f"{o} of {h} held-out tokens for {', '.join(labels)}"
                                 for (o, h), labels in counts.items()) + ".")
    if any("ce_loss_recovered_vs_mean" in r for r in rows):
        notes.append("CE recovered compares the LM's loss with the activations each model writes (its input for an "
                     "SAE, the MLP's output for a transcoder) replaced by the model's output, against zeroing them; "
                     "'(vs mean)' against replacing them by their mean over training tokens.")
    if any(f"{k}_se" in r for r in rows for k, _, _ in COLUMNS):
        notes.append("± is one standard error, by bootstrap over held-out contexts.")
    elif any(r.get("seeds", 1) > 1 for r in rows):
        notes.append(f"Each figure is the mean over {max(r.get('seeds', 1) for r in rows)} model seeds, ± their "
                     "standard deviation.")
    dense = _by_value(rows, lambda r: round(r["probe_dense"], 3) if "probe_dense" in r else None)
    if dense:
        reaches = (f"reaches {next(iter(dense)):.3f}" if len(dense) == 1 else "reaches " + "; ".join(
            f"{value:.3f} for {', '.join(labels)}" for value, labels in dense.items()))
        notes.append("'probe k=...' is k-sparse probing accuracy, the mean over the probing tasks (chance 0.5); the "
                     f"dense probe on the activations each model reads {reaches}.")
    if any(r.get("peer") for r in rows):
        notes.append("Rows marked SAELens are trained by SAELens's own trainer on the same samples and scored by the "
                     "same evaluation.")
    l0s = [r["l0"] for r in rows if "l0" in r]
    if len(l0s) > 1 and max(l0s) > 1.1 * min(l0s):
        notes.append(f"The methods sit at different L0s ({min(l0s):.1f} to {max(l0s):.1f}): rank only rows at "
                     "matching L0.")
    return notes


def write_comparison(out: Path, title: str, rows: list[dict[str, Any]],
                     per_seed: list[dict[str, Any]] | None = None) -> None:
    """``comparison.csv`` (``comparison_seeds.csv``: every seed's row), ``comparison.md``, ``comparison.png``
    and, where the data know the truth, ``report.md`` (with the best-against-SAELens ratio)."""
    out.mkdir(parents=True, exist_ok=True)
    header, body = comparison_table(rows)
    write_csv([{k: v for k, v in r.items() if k != "published"} for r in rows], out / "comparison.csv")
    if per_seed:
        write_csv(per_seed, out / "comparison_seeds.csv")
    notes = "".join(f"\n{line}\n" for line in comparison_notes(rows))
    table = format_table(body, header, markdown=True)
    atomic_write_text(out / "comparison.md", f"# {title}\n\n{table}\n{notes}")
    if any("latent_f1" in r for r in rows):
        plot_recovery(rows, out / "comparison.png", title)
        atomic_write_text(out / "report.md", recovery_report(title, rows, table, notes))
    else:
        plot_comparison(rows, out / "comparison.png", title)


def best_against_peer(rows: list[dict[str, Any]], l0_tolerance: float = 0.1) -> dict[str, Any] | None:
    """SAELens's best row by F1, and sae_zoo's best among the rows within ``l0_tolerance`` of its L0."""
    peers = [r for r in rows if r.get("peer") and "latent_f1" in r]
    if not peers:
        return None
    theirs = max(peers, key=lambda r: r["latent_f1"])
    matched = [r for r in rows if not r.get("peer") and "latent_f1" in r
               and abs(r["l0"] - theirs["l0"]) <= l0_tolerance * theirs["l0"]]
    if not matched:
        return None
    ours = max(matched, key=lambda r: r["latent_f1"])
    return {"ours": ours, "theirs": theirs, "f1_ratio": ours["latent_f1"] / theirs["latent_f1"],
            "mcc_ratio": ours["dictionary_mcc"] / theirs["dictionary_mcc"]}


def recovery_report(title: str, rows: list[dict[str, Any]], table: str, notes: str) -> str:
    """``report.md`` of a suite on data with known features: the table, the literature's figures, the plot and
    the best sae_zoo method against SAELens's best at matched L0."""
    lines = [f"# {title}", "", table, notes, "![F1 and MCC against L0 and inference FLOPs](comparison.png)", ""]
    published = [r for r in rows if r.get("published")]
    if published:
        keys = sorted({k for r in published for k in r["published"]})
        lines += ["## Published figures beside ours", "",
                  format_table([[r["label"], *(_fmt(r["published"].get(k)) for k in keys),
                                 *(_fmt(r.get(k)) for k in ("latent_f1", "dictionary_mcc", "ve"))] for r in published],
                               ["method", *(f"published {k}" for k in keys), "our F1", "our MCC", "our VE"],
                               markdown=True), ""]
    best = best_against_peer(rows)
    if best is not None:
        ours, theirs = best["ours"], best["theirs"]
        lines += ["## sae_zoo's best against SAELens's best", "",
                  f"SAELens's best: **{theirs['label']}** (F1 {theirs['latent_f1']:.3f}, MCC "
                  f"{theirs['dictionary_mcc']:.3f}, VE {theirs['ve']:.3f}, L0 {theirs['l0']:.1f}). sae_zoo's best "
                  f"within 10% of that L0: **{ours['label']}** (F1 {ours['latent_f1']:.3f}, MCC "
                  f"{ours['dictionary_mcc']:.3f}, "
                  f"VE {ours['ve']:.3f}, L0 {ours['l0']:.1f}, {ours['inference_flops']:.2e} inference FLOPs per sample "
                  f"against {theirs['inference_flops']:.2e}).", "",
                  f"Ratio, ours / SAELens's: F1 **{best['f1_ratio']:.3f}**, MCC **{best['mcc_ratio']:.3f}**.", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def comparison_text(out: Path, rows: list[dict[str, Any]]) -> str:
    """The suite's table, its notes and sae_zoo's best against SAELens's best, as a terminal shows them."""
    header, body = comparison_table(rows)
    lines = ["", format_table(body, header), *comparison_notes(rows)]
    best = best_against_peer(rows)
    if best is not None:
        lines.append(f"best sae_zoo method at SAELens's best L0: {best['ours']['label']}; ratio to "
                     f"{best['theirs']['label']}: F1 {best['f1_ratio']:.3f}, MCC {best['mcc_ratio']:.3f}")
    return "\n".join([*lines, f"\nruns, comparison.csv/.md and comparison.png: {out}"])
