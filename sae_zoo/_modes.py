"""``evaluating(module)``: a module in eval mode for a block, its own mode restored after (even on an error)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block: inference behaviour (a BatchTopK head keeps its threshold and does not update
    it, an iterative head solves instead of returning its warm start); the mode it had comes back after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
