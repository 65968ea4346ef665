"""An upgrade's named evals (``--evals absorption,autointerp``): run on the SAE's own encoder and on each
candidate's point nearest the SAE's L0 (the model its card describes), kept in ``evals/NAME.json`` (an upgrade run
again reuses them), and compared in ``comparison.md`` with paired standard errors: over the letters for absorption
(every encoder is judged by the same ground-truth probe on the same words), over the latents for autointerp (every
encoder is scored on the latents drawn for the SAE's own)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..data.base import LanguageModelData
from ..evals import EvalSettings, run_evals
from ..evaluation.absorption import counted_letters
from ..evaluation.autointerp import mean_and_se
from ..model import SparseCoder
from ..report import format_table
from .candidates import CANDIDATES, SOURCE, PointKey
from .report import nearest_point


def evaluate_points(out: Path, points: dict[PointKey, dict[str, Any]], models: dict[PointKey, SparseCoder],
                    datamodule: LanguageModelData, names: tuple[str, ...], settings: EvalSettings,
                    progress: bool) -> dict[PointKey, dict[str, Any]]:
    """Each of ``names`` on the SAE's encoder, then on each candidate's nearest point; autointerp scores every
    encoder on the latents drawn for the SAE's."""
    keys = [SOURCE] + [nearest_point(points, c) for c in dict.fromkeys(k.candidate for k in points if k != SOURCE)]
    identity = settings_identity(settings)
    results: dict[PointKey, dict[str, Any]] = {}
    for key in keys:
        path = out / "evals" / f"{key.name}.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        if done.get("settings") != identity:  # measured with other settings (words, latents, judge): measured again
            done = {"settings": identity}
        todo = [n for n in names if n not in done]
        if todo:
            figures, _ = run_evals(models[key], datamodule, todo, settings, progress)
            done.update(figures)
            atomic_write_json(path, done)
        if "autointerp" in done and settings.latents is None:
            settings.latents = [r["latent"] for r in done["autointerp"]["autointerp_per_latent"]]
        results[key] = done
    return results


def settings_identity(settings: EvalSettings) -> dict[str, Any]:
    """What the evals' figures depend on beyond the model, as JSON reads it back."""
    judge = settings.judge
    return json.loads(json.dumps({"absorption": settings.absorption, "autointerp": settings.autointerp,
                                  "judge": getattr(judge, "name", judge), "every_position": settings.every_position,
                                  "contexts": settings.contexts, "context_len": settings.context_len},
                                 default=lambda o: dataclasses.asdict(o)))


def paired(source: list[float], other: list[float], spec: str = ".4f") -> str:
    """`` (gain ± se)``: the mean gain of ``other`` over ``source``, item by item, and its standard error."""
    gain, se = mean_and_se([b - a for a, b in zip(source, other)])
    return f" ({gain:+{spec}} ± {se:{spec}})" if math.isfinite(se) else f" ({gain:+{spec}})"


def absorption_columns(source: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Mean absorption fraction and full absorption, with the gain over the SAE's ± its SE paired over letters."""
    # the same probe, words and letters for every encoder
    letters = counted_letters(source["absorption_per_letter"], source["absorption_min_probe_f1"])
    cells = []
    for key, figure in (("fraction", "mean_absorption_fraction_score"), ("full", "mean_full_absorption_score")):
        value = other[figure]
        cell = "-" if value is None else f"{value:.4f}"
        if other is not source and letters:
            cell += paired([source["absorption_per_letter"][l][key] for l in letters],
                           [other["absorption_per_letter"][l][key] for l in letters])
        cells.append(cell)
    return cells


def autointerp_columns(source: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Detection and fuzzing balanced accuracy, with the gain over the SAE's ± its SE paired over latents; where the
    judge failed its gate, no score (it would be noise)."""
    if not other["autointerp_informative"]:
        return ["uninformative (judge failed its gate)"] * 2
    cells = []
    for kind in ("detection", "fuzzing"):
        cell = f"{other[f'autointerp_{kind}']:.3f}"
        if other is not source:
            mine = {r["latent"]: r[kind]["balanced_accuracy"] for r in source["autointerp_per_latent"]}
            theirs = {r["latent"]: r[kind]["balanced_accuracy"] for r in other["autointerp_per_latent"]}
            common = [latent for latent in mine if latent in theirs]
            cell += paired([mine[i] for i in common], [theirs[i] for i in common], ".3f")
        cells.append(cell)
    return cells


def evals_section(points: dict[PointKey, dict[str, Any]], results: dict[PointKey, dict[str, Any]]) -> str:
    """``comparison.md``'s section on the named evals (empty when none ran)."""
    names = [n for n in ("absorption", "autointerp") if n in results[SOURCE]]
    if not names:
        return ""
    source = results[SOURCE]
    header = ["encoder", "L0"]
    if "absorption" in names:
        header += ["mean absorption fraction", "full absorption"]
    if "autointerp" in names:
        header += ["detection", "fuzzing"]
    rows = []
    for key, figures in results.items():
        label = CANDIDATES[key.candidate].label if key != SOURCE else "the SAE's own encoder"
        row = [label, f"{points[key]['l0']:.1f}"]
        if "absorption" in names:
            row += absorption_columns(source["absorption"], figures["absorption"])
        if "autointerp" in names:
            row += autointerp_columns(source["autointerp"], figures["autointerp"])
        rows.append(row)
    notes = [f"Each candidate at its sweep point nearest the SAE's L0 ({points[SOURCE]['l0']:.1f}; the L0 column "
             "gives the point's own), the model its card describes. In brackets: the gain over the SAE's encoder "
             "± its standard error, paired."]
    if "absorption" in names:
        a = source["absorption"]
        notes.append(f"Absorption: SAEBench's first-letter task; the ground-truth probe reaches F1 > 0.6 on "
                     f"{a['absorption_probe_letters_passing']} of 26 letters (SAEBench's gate needs 20: "
                     f"{'passed' if a['absorption_gate_passed'] else 'FAILED'}); means over the "
                     f"{a['absorption_letters']} letters counted, pairs over the same letters. Lower is better.")
    if "autointerp" in names:
        a = source["autointerp"]
        notes.append(f"Auto-interpretability: judge {a['autointerp_judge']}, {a['autointerp_latents']} latents (the "
                     f"same indices for every encoder), pairs over latents. Judge gate: detection "
                     f"{a['gate_true']:.3f} with the true explanations (needs >= 0.75), {a['gate_shuffled']:.3f} "
                     f"with them shuffled (needs <= 0.55): {'passed' if a['gate_passed'] else 'FAILED'}"
                     + ("" if a["gate_passed"] else "; the scores are uninformative and not shown "
                        "(`evals/*.json` keeps them, marked autointerp_informative: false)") + ".")
    return ("\n## Absorption and auto-interpretability\n\n" + " ".join(notes) + "\n\n"
            + format_table(rows, header, markdown=True) + "\n")
