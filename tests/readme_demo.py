"""The README's ``make demo`` block against what ``sae-zoo demo`` prints (CI runs the demo, then this):

    .venv/bin/sae-zoo demo --no-progress | tee runs/demo.log
    .venv/bin/python tests/readme_demo.py runs/demo.log

The demo is bitwise reproducible on one machine, but its last digits move from one CPU to another: the same sums in
another order (other vector instructions), amplified over 20,000 steps (one machine's MLP row read FVU 0.0124 and
L0 8.14, another's 0.0127 and 8.08). So the figures are held to the demo's within that spread: MCC and the gap
within 0.005, FVU within 5%, L0 within 0.15; the table's rows and labels exactly.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^(SAE \(linear\)|MLP \(hidden=\d+\))\s+([\d.]+)\s+([\d.]+ \+- [\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
                 re.M)
GAP = re.compile(r"recovers the codes ([+-][\d.]+) MCC better")
#: how far each figure may lie from the demo's (absolute, or relative for FVU)
SPREAD = {"MCC": 0.005, "FVU": 0.05, "L0": 0.15, "gap": 0.005}


def figures(text: str) -> dict[str, dict[str, float]]:
    """``{row label: {MCC, paper, FVU, L0}}`` of a demo table in ``text``, and ``{"gap": {"gap": value}}``."""
    rows = {label: {"MCC": float(mcc), "paper": paper, "FVU": float(fvu), "L0": float(l0)}
            for label, mcc, paper, fvu, l0 in ROW.findall(text)}
    gap = GAP.search(text)
    if len(rows) != 2 or gap is None:
        raise ValueError("no demo table (an SAE row, an MLP row and the amortisation gap) in the text")
    return {**rows, "gap": {"gap": float(gap.group(1))}}


def readme_block(readme: str) -> str:
    """The README's block of the demo's output: the fenced block after ``make demo`` prints."""
    match = re.search(r"`make demo` prints.*?```\n(.*?)```", readme, re.S)
    if match is None:
        raise ValueError("README.md: no fenced block after '`make demo` prints'")
    return match.group(1)


def disagreements(readme: str, demo_output: str) -> list[str]:
    """Where the README's block and the demo's output disagree (nothing: they agree)."""
    ours, theirs = figures(readme_block(readme)), figures(demo_output)
    if set(ours) != set(theirs):
        return [f"rows: README {sorted(ours)}, demo {sorted(theirs)}"]
    found = []
    for label, values in ours.items():
        for key, value in values.items():
            demo = theirs[label][key]
            spread = SPREAD.get(key)
            far = (value != demo if spread is None else
                   abs(value - demo) > (spread * abs(demo) if key == "FVU" else spread))
            if far:
                found.append(f"{label} {key}: README {value}, demo {demo}")
    return found


def main(log: str) -> int:
    found = disagreements(README.read_text(), Path(log).read_text())
    for line in found:
        print(f"README.md's demo block: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
