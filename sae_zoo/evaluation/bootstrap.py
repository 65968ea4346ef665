"""Standard errors by bootstrap over contexts: tokens of one context are not independent, contexts are."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

#: bootstrap resamples behind every standard error
N_BOOTSTRAP = 1000


def bootstrap_se(statistic: Callable[[Tensor], Tensor], n_units: int, n_bootstrap: int = N_BOOTSTRAP,
                 seed: int = 0) -> float:
    """Standard error of ``statistic(weights)`` over ``n_bootstrap`` resamples of ``n_units`` units with
    replacement; ``weights`` ``(n_bootstrap, n_units)`` counts how often each unit was drawn (float64).
    NaN with fewer than two units."""
    if n_units < 2:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_units, (n_bootstrap, n_units), generator=generator)
    weights = torch.zeros(n_bootstrap, n_units, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_bootstrap, n_units, dtype=torch.float64))
    return float(statistic(weights).std())
