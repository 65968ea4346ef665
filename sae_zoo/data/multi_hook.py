"""Several hooks from one pass of the language model: one model per hook (an SAE's hook, or a transcoder's input
and target hooks), all trained on the fly from the same forward passes, as sparsify trains every layer at once and
SAELens's multi-SAE runner does.

:class:`MultiHookData` holds one :class:`~sae_zoo.data.activations.ActivationDataModule` per hook, each with its own
held-out set and statistics (its scale, outlier bounds, mean target), which evaluation reads as it reads any single
hook's data. Training reads every hook in each forward pass, which stops at the last of them, into one mixing
buffer whose rows stay aligned across the hooks: a token is left out of every hook's batches when it is an outlier
at any of them. Batches are mappings, hook name -> that hook's batch (a :class:`~sae_zoo.data.base.Pair` for a
transcoder's), which a :class:`~sae_zoo.multihead.HeadBank` routes to each hook's model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..lm import read_many
from .activations import ActivationDataModule, any_outlier
from .base import Pair
from .live import LiveActivations


def hook_name(hook: str | list[str] | tuple[str, ...]) -> str:
    """A hook's name, for its model and its run folder: ``hook``, or ``IN_to_OUT`` for a transcoder's pair."""
    return hook if isinstance(hook, str) else f"{hook[0]}_to_{hook[1]}"


def check_hooks(hooks: Any) -> list[tuple[str, str | None]]:
    """``data.hooks`` as ``(hook, hook_out or None)`` pairs; a malformed list or a repeated hook is refused by name."""
    if not isinstance(hooks, (list, tuple)) or not hooks:
        raise ValueError(f"data.hooks must be a non-empty list of hooks (or [input, target] pairs), got {hooks!r}")
    pairs = []
    for i, hook in enumerate(hooks):
        if isinstance(hook, str):
            pairs.append((hook, None))
        elif isinstance(hook, (list, tuple)) and len(hook) == 2 and all(isinstance(h, str) for h in hook):
            pairs.append((hook[0], hook[1]))
        else:
            raise ValueError(f"data.hooks[{i}]: {hook!r} is neither a hook nor an [input, target] pair of hooks")
    names = [hook_name(list(p) if p[1] else p[0]) for p in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"data.hooks: {', '.join(repeated)} is listed more than once")
    return pairs


class MultiHookData(L.LightningDataModule):
    """One model's data per hook (``parts``: name -> single-hook datamodule, all alike but for their hooks), trained
    from one LM pass; see the module docstring."""

    def __init__(self, parts: dict[str, ActivationDataModule]) -> None:
        super().__init__()
        first = next(iter(parts.values()))
        if first.hparams.cache:
            raise ValueError("data.hooks trains on the fly: a cache per hook would write every hook's activations to "
                             "disk; set data.cache=false, or run one recipe per hook")
        self.parts, self.first = parts, first
        self._live: LiveActivations | None = None
        self._resume_state: dict[str, Any] | None = None

    def check_hooks(self) -> None:
        """Every hook resolves in the LM, and no two name the same place; before any forward pass."""
        seen: dict[tuple[str, str], str] = {}
        for name, part in self.parts.items():
            _, _, hook = part.language_model()
            for point in (hook, part.target_hook) if part.paired else (hook,):
                where = (point.path, point.side)
                if seen.setdefault(where, name) != name:
                    raise ValueError(f"data.hooks: {name!r} reads the {point.side} of {point.path}, as "
                                     f"{seen[where]!r} does: list each place once")

    def prepare_data(self) -> None:
        """Each hook's held-out set and statistics."""
        self.check_hooks()
        for part in self.parts.values():
            part.prepare_data()

    @property
    def points(self) -> list[Any]:
        """The hook points one forward pass reads: each part's input, and a pair's target after it."""
        out = []
        for part in self.parts.values():
            _, _, hook = part.language_model()
            out += [hook, part.target_hook] if part.paired else [hook]
        return out

    @torch.no_grad()
    def live_rows(self, tokens: Tensor) -> tuple[Tensor, ...]:
        """The rows of every hook (each part's sides, in order) of contexts ``tokens``, from one forward pass per
        ``model_batch_size`` contexts: scaled, tokens that are outliers at any hook left out."""
        h = self.first.hparams
        lm, _, _ = self.first.language_model()
        points = self.points
        chunks = [read_many(lm, points, chunk) for chunk in tokens.split(h.model_batch_size)]
        first = 1 if h.prepend_bos and h.drop_bos else 0
        sides = [torch.cat([chunk[i].float().cpu() for chunk in chunks])[:, first:].flatten(0, 1)
                 for i in range(len(points))]
        scales, bounds = [], []
        for part in self.parts.values():
            scales += [part.scale, part.target_scale] if part.paired else [part.scale]
            bounds += [part.outlier_norm, part.target_outlier_norm] if part.paired else [part.outlier_norm]
        sides = [side * scale for side, scale in zip(sides, scales)]
        keep = ~any_outlier(sides, bounds)
        return tuple(side[keep] for side in sides)

    def pack(self, sides: tuple[Tensor, ...]) -> dict[str, Tensor | Pair]:
        batch, i = {}, 0
        for name, part in self.parts.items():
            batch[name] = Pair(sides[i], sides[i + 1]) if part.paired else sides[i]
            i += 2 if part.paired else 1
        return batch

    def live(self, rank: int | None = None, world_size: int | None = None) -> LiveActivations:
        first = self.first
        if rank is None or world_size is None:
            trainer = getattr(self, "trainer", None)
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._live = first.live(rank, world_size, read=self.live_rows, pack=self.pack, resume=self._resume_state)
        self._resume_state = None
        return self._live

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.live(), batch_size=None)

    def sample_batches(self) -> Iterable[dict[str, Tensor | Pair]]:
        return (self.live() if self._live is None else self._live).sample()

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        served = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        return {} if self._live is None else {"live": self._live.state_dict(served)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_state = state.get("live")

