"""An upgrade's results: each candidate read off its sweep at the SAE's L0, its gains over the SAE's encoder
with paired standard errors, the tables, plot and cards."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..evaluation import Evaluation, paired_gain_se
from ..evaluation.probing import mean_accuracy, probe_names
from ..model import SparseCoder
from ..report import format_table, plot_upgrade, write_csv
from .candidates import CANDIDATES, SOURCE, PointKey

log = logging.getLogger(__name__)

COLUMNS = ["candidate", "label", "ratio", "knob", "l0", "fvu", "fvu_se", "fvu_with_outliers", "ce_loss_recovered",
           "ce_loss_recovered_se", "dead_latents", "inference_flops", "seconds"]
#: what a point's figures are, as ``points/NAME.json`` holds them
Points = dict[PointKey, dict[str, Any]]


def evaluation_file(out: Path, key: PointKey) -> Path:
    """Where a point's :class:`~sae_zoo.evaluation.Evaluation` is kept, for the paired standard errors."""
    return out / "points" / f"{key.name}.pt"


def read_evaluation(out: Path, key: PointKey) -> Evaluation:
    return Evaluation.from_state(torch.load(evaluation_file(out, key), weights_only=True))


def bracket(points: list[dict[str, Any]], l0: float) -> list[tuple[int, float]] | None:
    """How to read a value at ``l0`` off ``points``: ``[(index, weight), ...]``, linear in log L0 between the two
    points around it, or one point within 2% of it; None outside the points' range (never extrapolated)."""
    order = sorted((p["l0"], i) for i, p in enumerate(points) if p["l0"] > 0)
    for x, i in order:
        if abs(x - l0) <= 0.02 * l0:
            return [(i, 1.0)]
    for (x0, i0), (x1, i1) in zip(order, order[1:]):
        if x0 <= l0 <= x1:
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return [(i0, 1 - t), (i1, t)]
    return None


def nearest_point(points: dict[PointKey, dict[str, Any]], candidate: str) -> PointKey:
    """The candidate's point whose L0 is nearest the SAE's (in log L0)."""
    l0 = points[SOURCE]["l0"]
    return min((k for k in points if k.candidate == candidate),
               key=lambda k: abs(math.log(max(points[k]["l0"], 1e-9) / l0)))


def at_l0(points: list[dict[str, Any]], l0: float, key: str) -> float | None:
    """``key`` at ``l0`` (see :func:`bracket`)."""
    weights = bracket(points, l0)
    return None if weights is None else sum(w * points[i][key] for i, w in weights)


def gain_standard_errors(source: Evaluation, mix: list[tuple[Evaluation, float]]) -> dict[str, float]:
    """Standard errors of a candidate's gains over the SAE at its L0 (the candidate's points mixed as
    :func:`bracket` says): FVU by bootstrap over the held-out contexts, CE-loss recovered over the CE contexts
    and each probe's mean accuracy (``probe_<probe>``) over the probing documents, each paired (the same
    resamples for both)."""
    out = {"fvu": paired_gain_se(source, mix, lambda e, w: e.tokens.clean.fvu(w), source.tokens.clean.n_contexts),
           "ce_loss_recovered": paired_gain_se(source, mix, lambda e, w: e.ce.recovered(w), len(source.ce.clean))}
    if source.probes:
        n_documents = next(iter(source.probes.values())).shape[1]
        for probe in probe_names(source.probes):
            out[f"probe_{probe}"] = paired_gain_se(source, mix, lambda e, w, p=probe: mean_accuracy(e.probes, p, w),
                                                   n_documents)
    return out


def probe_keys(source: Evaluation) -> list[str]:
    """The probing accuracies averaged over tasks that every point holds (``probe_k<k>``, ``probe_dense``)."""
    return [f"probe_{probe}" for probe in probe_names(source.probes)]


def summary(out: Path, points: Points, candidates: tuple[str, ...], source: Evaluation) -> list[dict[str, Any]]:
    """Per candidate: FVU and CE-loss recovered at the SAE's L0 (interpolated), their gains over the SAE
    (``source``: its evaluation) and the gains' paired standard errors; ``clear`` when both gains exceed twice
    their standard error."""
    src = points[SOURCE]
    probes = probe_keys(source)
    keys = ("fvu", "fvu_se", "ce_loss_recovered", "ce_loss_recovered_se", *probes)
    rows = [{"candidate": "source", "label": src["label"], "l0": src["l0"], "inference_flops": src["inference_flops"],
             **{k: src[k] for k in keys}}]
    for candidate in candidates:
        names = [k for k in points if k.candidate == candidate]
        pts = [points[k] for k in names]
        weights = bracket(pts, src["l0"]) if pts else None
        row = {"candidate": candidate, "label": CANDIDATES[candidate].label, "l0": src["l0"],
               "inference_flops": pts[0]["inference_flops"] if pts else None,
               **{k: at_l0(pts, src["l0"], k) for k in keys}}
        if weights is not None:
            se = gain_standard_errors(source, [(read_evaluation(out, names[i]), w) for i, w in weights])
            for key in probes:
                row[f"{key}_gain"], row[f"{key}_gain_se"] = row[key] - src[key], se[key]
            row.update(fvu_gain=(src["fvu"] - row["fvu"]) / src["fvu"], fvu_gain_se=se["fvu"] / src["fvu"],
                       ce_gain=row["ce_loss_recovered"] - src["ce_loss_recovered"], ce_gain_se=se["ce_loss_recovered"])
            row["clear"] = row["fvu_gain"] > 2 * row["fvu_gain_se"] and row["ce_gain"] > 2 * row["ce_gain_se"]
        rows.append(row)
    return rows


def _f(value: Any, spec: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, ("+" if signed else "") + spec)


def _where(row: dict[str, Any], key: str) -> str:
    if row["candidate"] == "source":
        return "measured"
    return "outside the sweep" if row[key] is None else "interpolated"


def probing_table(rows: list[dict[str, Any]], keys: list[str], markdown: bool) -> str:
    """Mean k-sparse probing accuracy over the tasks, per encoder, at the SAE's L0."""
    ks = [k for k in keys if k != "probe_dense"]

    def cell(r: dict[str, Any], k: str) -> str:
        gain, se = r.get(f"{k}_gain"), r.get(f"{k}_gain_se")
        return _f(r[k], ".3f") + ("" if gain is None else f" ({_f(gain, '.3f', True)} ± {_f(se, '.3f')})")

    table = [[r["label"], *(cell(r, k) for k in ks), _where(r, ks[0])] for r in rows]
    return format_table(table, ["encoder", *(f"k={k.removeprefix('probe_k')}" for k in ks), "at the SAE's L0"],
                        markdown=markdown)


def comparison_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    def pm(value: Any, se: Any, spec: str) -> str:
        return "-" if value is None else f"{_f(value, spec)} ± {_f(se, spec)}"

    def gain(value: Any, se: Any, spec: str) -> str:
        return "-" if value is None else f"{_f(value, spec, True)} ± {_f(se, spec)}"

    table = [[r["label"], pm(r["fvu"], r["fvu_se"], ".4f"), gain(r.get("fvu_gain"), r.get("fvu_gain_se"), ".1%"),
              pm(r["ce_loss_recovered"], r["ce_loss_recovered_se"], ".4f"),
              gain(r.get("ce_gain"), r.get("ce_gain_se"), ".4f"), _f(r["inference_flops"], ".2e"),
              _where(r, "fvu")] for r in rows]
    header = ["encoder", "FVU", "less FVU", "CE recovered", "CE gain", "inference FLOPs/token", "at the SAE's L0"]
    return format_table(table, header, markdown=markdown)


def write_comparison(out: Path, source: str, points: Points, candidates: tuple[str, ...],
                     source_evaluation: Evaluation, evals: str = "") -> str:
    """``comparison.csv`` (every point), ``comparison.png`` and ``comparison.md`` (with ``evals``, the named
    evals' section, at its end); returns the text a terminal shows."""
    rows = summary(out, points, candidates, source_evaluation)
    l0 = points[SOURCE]["l0"]
    order = list(CANDIDATES)
    ordered = [points[SOURCE]] + sorted((p for k, p in points.items() if k != SOURCE),
                                        key=lambda p: (order.index(p["candidate"]), p["l0"]))
    probes = probe_keys(source_evaluation)
    write_csv(ordered, out / "comparison.csv", COLUMNS + [k for k in points[SOURCE] if k.startswith("probe_")])
    plot_upgrade(ordered, l0, out / "comparison.png", title=f"Upgrading {source} on its frozen decoder")
    better = [r for r in rows[1:] if (r.get("fvu_gain") or 0) > 0 and (r.get("ce_gain") or 0) > 0]
    clear, within = [r["label"] for r in better if r["clear"]], [r["label"] for r in better if not r["clear"]]
    verdict = " ".join(filter(None, [
        clear and f"Better than the SAE's encoder on both FVU and CE-loss recovered at its L0, each gain above twice "
                  f"its standard error: {', '.join(clear)}.",
        within and f"Better on both, but within twice the standard error on one: {', '.join(within)}.",
        not better and "No candidate beats the SAE's encoder on both FVU and CE-loss recovered at its L0."]))
    text = (f"# Upgrading {source}\n\nEvery encoder decodes with the SAE's frozen decoder. Values at the SAE's own "
            f"L0 ({l0:.1f}), interpolated in log L0 between each candidate's sweep points (`comparison.csv`; "
            "`comparison.png` plots them); FVU leaves the outlier tokens out, as the SAE's training did. "
            "\"less FVU\" is relative to the SAE's; \"CE gain\" is in points of CE-loss recovered. ± is one standard "
            "error by bootstrap over the held-out contexts; for the gains, paired: the same resamples for the "
            "candidate and the SAE, which were measured on the same contexts.\n\n"
            f"{comparison_table(rows, markdown=True)}\n\n{verdict}\n")
    shown = f"\nAt the SAE's L0 ({l0:.1f}), on its frozen decoder:\n{comparison_table(rows, markdown=False)}\n\n{verdict}"
    if probes:
        about = (f"k-sparse probing accuracy at the SAE's L0, the mean over the tasks (per task, with standard errors "
                 f"over documents: `comparison.csv`), and in brackets the gain over the SAE's encoder ± its paired "
                 f"standard error (the same bootstrap resamples of the documents for both); chance is 0.5, the dense "
                 f"probe on the activations reaches {points[SOURCE]['probe_dense']:.3f}.")
        text += f"\n## Sparse probing\n\n{about}\n\n{probing_table(rows, probes, markdown=True)}\n"
        shown += f"\n\n{about}\n{probing_table(rows, probes, markdown=False)}"
    text += evals
    shown += evals
    atomic_write_text(out / "comparison.md", text)
    return shown + f"\n\nwrote {out / 'comparison.md'}, {out / 'comparison.csv'} and {out / 'comparison.png'}"


def write_cards(out: Path, source: str, points: Points, models: dict[PointKey, SparseCoder], probes: list[str]) -> None:
    """Per candidate, the model of the point nearest the SAE's L0 (``models``: each point's model, as measured),
    with a card saying what it upgrades; ``probes``: the probing accuracies the points hold (:func:`probe_keys`)."""
    src = points[SOURCE]
    probes = [k for k in probes if k != "probe_dense"]
    for candidate in {k.candidate for k in points} - {SOURCE.candidate}:
        key = nearest_point(points, candidate)
        p = points[key]
        model = models[key]
        note = (f"This head upgrades the SAE `{source}`: it encodes for that SAE's frozen decoder. At L0 "
                f"{p['l0']:.1f} (the SAE's: {src['l0']:.1f}; {p['knob']}), on the same held-out tokens:\n\n"
                f"| | this head | the SAE's encoder |\n|---|---|---|\n"
                f"| FVU | {p['fvu']:.4f} | {src['fvu']:.4f} |\n"
                f"| CE-loss recovered | {p['ce_loss_recovered']:.4f} | {src['ce_loss_recovered']:.4f} |\n"
                f"| inference FLOPs per token | {p['inference_flops']:.3g} | {src['inference_flops']:.3g} |\n"
                + "".join(f"| {k.removeprefix('probe_k')}-sparse probing accuracy (mean over tasks) | {p[k]:.3f} | "
                          f"{src[k]:.3f} |\n" for k in probes) + "\n"
                "Compare at equal L0 only: `comparison.md` of the upgrade gives every candidate at the SAE's L0.")
        metrics = {k: p[k] for k in ("fvu", "l0", "dead_latents", "ce_loss_recovered", *probes, "probe_dense")
                   if k in p}
        model.save_pretrained(out / "cards" / candidate, model_card_kwargs={"metrics": metrics, "upgrade": note})
