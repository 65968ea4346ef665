"""Reporting: tables (terminal and markdown), CSV files and plots, for the CLI, suites and the frontier.

Everything here reads results (rows of dicts, run directories) and writes files atomically; nothing
here trains or evaluates.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ._io import atomic_write, atomic_write_text


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str], markdown: bool = False) -> str:
    """``rows`` under ``header``, aligned for a terminal or as a GitHub markdown table: the first column
    (the names) to the left, the figures to the right, printed as given."""
    align = ("left",) + ("right",) * (len(header) - 1)
    return tabulate(rows, headers=header, tablefmt="github" if markdown else "simple", disable_numparse=True,
                    colalign=align)


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    print(format_table(rows, header))


def write_csv(rows: list[dict[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV, with ``columns`` (default: every key of every row, sorted)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or sorted({k for r in rows for k in r})))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))  # legends outside
    _pyplot().close(fig)
    return Path(path)


def read_curve(run_dir: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``metric`` (e.g. ``"val/mcc"``) as the run logged it."""
    steps, values = [], []
    with open(Path(run_dir) / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get(metric):
                steps.append(int(row["step"]))
                values.append(float(row[metric]))
    return steps, values


def plot_curves(runs: dict[str, list[Path]], path: str | Path, metric: str = "val/mcc",
                reference: dict[str, float] | None = None, title: str = "", ylabel: str | None = None) -> Path:
    """One colour per label: every run's curve thin, their mean bold, the paper's value dashed."""
    import numpy as np

    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for i, (label, run_dirs) in enumerate(runs.items()):
        color = f"C{i}"
        curves = [read_curve(run_dir, metric) for run_dir in run_dirs]
        for steps, values in curves:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        n = min(len(values) for _, values in curves)
        mean = np.mean([values[:n] for _, values in curves], axis=0)
        ax.plot(curves[0][0][:n], mean, color=color, linewidth=2.2, label=f"{label} (final {mean[-1]:.3f})")
        if reference and label in reference:
            ax.axhline(reference[label], color=color, linestyle="--", linewidth=1, label=f"{label}, paper")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_comparison(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """FVU against L0 for each run of a suite and, where every run has it, CE-loss recovered as bars."""
    plt = _pyplot()
    has_ce = all("ce_loss_recovered" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(12 if has_ce else 6, 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0][0]
    for i, r in enumerate(rows):
        ax.scatter(r["l0"], r["fvu"], s=50, color=colors[i % len(colors)], label=r["label"],
                   marker="os^Dv<>"[i % 7], alpha=0.85)
    ax.set(xlabel="L0 (active latents per token)", ylabel="FVU (held-out)", title="Reconstruction against sparsity")
    ax.legend(fontsize=8)
    if has_ce:
        ax = axes[0][1]
        values = [r["ce_loss_recovered"] for r in rows]
        ax.barh(range(len(rows)), values, color=[colors[i % len(colors)] for i in range(len(rows))])
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        low = min(values)
        ax.set_xlim(max(0.0, low - 0.5 * (1 - low) - 0.02) if low < 1 else 0.0, 1.0 + 0.15 * (1 - min(low, 0.99)))
        ax.set(xlabel="CE-loss recovered", title="LM loss with the reconstruction spliced in")
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_upgrade(points: list[dict[str, Any]], l0: float, path: Path, title: str) -> Path:
    """An upgrade's Pareto plot: FVU and CE-loss recovered against L0 (log scale), one line per candidate
    through its sweep, the SAE's own encoder as a star, its L0 dashed; error bars are standard errors."""
    from matplotlib.ticker import ScalarFormatter

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    candidates = list(dict.fromkeys(p["candidate"] for p in points if p["candidate"] != "source"))
    for ax, (metric, name) in zip(axes[0], (("fvu", "FVU (held-out, outlier tokens left out)"),
                                            ("ce_loss_recovered", "CE-loss recovered"))):
        for i, candidate in enumerate(candidates):
            pts = sorted((p for p in points if p["candidate"] == candidate), key=lambda p: p["l0"])
            ax.errorbar([p["l0"] for p in pts], [p[metric] for p in pts], yerr=[p.get(f"{metric}_se") for p in pts],
                        fmt="-" + "os^Dv<>"[i % 7], color=colors[i % len(colors)], capsize=2, markersize=5,
                        label=pts[0]["label"])
        source = next(p for p in points if p["candidate"] == "source")
        ax.plot(source["l0"], source[metric], "*", color="black", markersize=14, label=source["label"])
        ax.axvline(l0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set(xlabel="L0 (active latents per token)", ylabel=name)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}\n(compare at the dashed line: the SAE's own L0)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_recovery(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Feature recovery on data with known features: F1 and decoder MCC (rows) against L0 and against
    inference FLOPs per sample (columns), one marker per method, bars the spread over seeds; SAELens's
    runs hollow; the runs of one ``curve`` joined by a line against L0."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9 + 0.16 * len(rows)), squeeze=False)
    colors = plt.get_cmap("tab20").colors if len(rows) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row_axes, (metric, name) in zip(axes, (("latent_f1", "F1 (latents as feature detectors)"),
                                               ("dictionary_mcc", "MCC (decoder against true features)"))):
        for ax, (x_key, x_name) in zip(row_axes, (("l0", "L0 (active latents per sample)"),
                                                  ("inference_flops", "inference FLOPs per sample"))):
            for i, r in enumerate(rows):
                if r.get(metric) is None or r.get(x_key) is None:
                    continue
                color = colors[i % len(colors)]
                ax.errorbar(r[x_key], r[metric], yerr=r.get(f"{metric}_sd"), xerr=r.get(f"{x_key}_sd"),
                            fmt="os^Dv<>P*X"[i % 10], markersize=7, capsize=3, color=color,
                            markerfacecolor="none" if r.get("peer") else color, label=r["label"])
            for i, r in enumerate(rows):  # a curve: one method's runs at several L0s, in the colour of its first
                curve = [c for c in rows if r.get("curve") and c.get("curve") == r["curve"]]
                if curve and curve[0] is r and x_key == "l0":
                    points = sorted((c[x_key], c[metric]) for c in curve if c.get(metric) is not None)
                    ax.plot(*zip(*points), color=colors[i % len(colors)], alpha=0.6,
                            linestyle="--" if r.get("peer") else "-")
            if x_key == "inference_flops":
                ax.set_xscale("log")
            ax.set(xlabel=x_name, ylabel=name)
            ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_height = 0.015 + 0.013 * ((len(labels) + 1) // 2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{title}\n(rank methods only at matching L0; hollow markers: SAELens's own training)", fontsize=10)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    return save_figure(fig, path)


def plot_frontier(summary: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per frontier panel: each method's mean test MCC (band: +- std over seeds) against total FLOPs."""
    import numpy as np

    fig, axes = _pyplot().subplots(1, len(summary), figsize=(8.5 * len(summary), 5.0), squeeze=False)
    for ax, (panel, methods) in zip(axes[0], summary.items()):
        for i, m in enumerate(methods):
            x = [c["flops"] for c in m["curve"]]
            y = np.array([c["mcc"] for c in m["curve"]])
            s = np.array([c["std"] for c in m["curve"]])
            marker = "o" if len(x) > 1 else "s"
            ax.plot(x, y, marker=marker, markersize=4, color=f"C{i % 10}", linestyle="-" if i < 10 else "--",
                    label=m["label"])
            ax.fill_between(x, y - s, y + s, color=f"C{i % 10}", alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("total FLOPs (training + inference)")
        ax.set_ylabel("test MCC")
        ax.set_title(panel.replace("_", " "))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
