"""Plots of finished runs, read from their ``logs/metrics.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

from ._io import atomic_write


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
