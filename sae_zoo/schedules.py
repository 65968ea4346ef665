"""One way to write a schedule's length, for the learning rate, the sparsity warm-up and a top-k head's k
annealing alike: a whole number of steps, or a fraction of the run (0.1: its first or last 10%)."""

from __future__ import annotations


def steps_or_fraction(value: float, name: str) -> int | float:
    """A schedule length ``name``: a whole number of steps (an int), or a fraction of the run in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of steps >= 0 or a fraction of the run in (0, 1), got {value!r}")
    if 0 < value < 1:
        return float(value)
    if value != int(value):
        raise ValueError(f"{name} >= 1 counts steps, so it must be a whole number, got {value!r}")
    return int(value)


def schedule_steps(length: int | float, total_steps: float | None, name: str) -> int:
    """A schedule's length (:func:`steps_or_fraction`) in steps: itself, or its fraction of the run's
    ``total_steps``, which must then be known (None or infinite: it is not)."""
    if not isinstance(length, float):
        return int(length)
    if total_steps is None or not 0 < total_steps < float("inf"):
        raise ValueError(f"{name}={length} is a fraction of the run, which needs a known number of training steps: "
                         f"set trainer.max_steps, or give {name} in steps")
    return round(length * total_steps)
