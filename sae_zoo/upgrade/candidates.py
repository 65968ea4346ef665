"""The encoders an upgrade tries on the SAE's frozen decoder, as a registry: a candidate is one
:class:`Candidate` object, registered with :func:`register_candidate`, saying how it is labelled, whether it
trains, how it is built from the SAE's encoder at a multiple of its L0, and what it refuses before any work."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..encoders import EncoderHead, create_encoder
from ..encoders.mlp import ResidualMLPEncoder
from ..model import SparseCoder


@dataclass
class Start:
    """What every candidate is built from: the SAE's encoder, its L0, the L1 coefficient at which its codes are
    closest to optimal (:func:`stationary_l1`; given, or a function computing it when a candidate first needs it:
    a top-k sweep never does) and the upgrade's options (:class:`~sae_zoo.upgrade.UpgradeOptions`: ``lr``,
    ``hidden``, ``solver_steps``)."""

    head: EncoderHead
    l0: float
    l1_source: float | Callable[[], float]
    options: Any

    @functools.cached_property
    def l1(self) -> float:
        return self.l1_source() if callable(self.l1_source) else float(self.l1_source)


class Built(NamedTuple):
    """A candidate at one point of the sweep: its head, the :class:`~sae_zoo.SparseCoder` arguments it trains
    with (none for a head that only infers), and its sparsity knob's setting, as the report prints it."""

    head: EncoderHead
    model_kwargs: dict[str, Any]
    knob: str


@dataclass(frozen=True)
class Candidate:
    """An encoder tried on the SAE's frozen decoder. ``build(start, ratio)`` gives it at ``ratio`` x the SAE's L0;
    ``trains``: whether it learns (the trained ones learn together from one pass over the activations) or only
    infers; ``check(source, head)`` raises ``ValueError``, before any long work, when it cannot start from this
    SAE's encoder; ``amortised``: whether it encodes in one pass, without reconstructing its input through the
    decoder (only amortised candidates apply to a transcoder, whose decoder writes another activation)."""

    name: str
    label: str
    trains: bool
    build: Callable[[Start, float], Built]
    check: Callable[[str, EncoderHead], None] | None = None
    amortised: bool = True


#: name -> candidate, in the order they are reported
CANDIDATES: dict[str, Candidate] = {}


def register_candidate(candidate: Candidate) -> Candidate:
    """Add ``candidate`` to :data:`CANDIDATES` (``sae-zoo upgrade --candidates NAME`` then finds it)."""
    if candidate.name in CANDIDATES or candidate.name == "source":
        raise ValueError(f"an upgrade candidate named {candidate.name!r} is already registered")
    CANDIDATES[candidate.name] = candidate
    return candidate


def default_candidates(transcoder: bool) -> tuple[str, ...]:
    """Every registered candidate; a transcoder's upgrade, the amortised ones."""
    return tuple(name for name, c in CANDIDATES.items() if c.amortised or not transcoder)


def check_candidates(source: str, head: EncoderHead, names: tuple[str, ...], transcoder: bool = False) -> None:
    """Refuse, before any long work, a candidate this SAE's encoder cannot start."""
    for name in names:
        if transcoder and not CANDIDATES[name].amortised:
            raise ValueError(f"{source} is a transcoder: the candidate {name!r} finds codes by reconstructing its "
                             "input through the decoder, which writes the target instead; a transcoder's upgrade tries "
                             f"amortised candidates ({', '.join(default_candidates(True))})")
        if CANDIDATES[name].check is not None:
            CANDIDATES[name].check(source, head)


@torch.no_grad()
def stationary_l1(model: SparseCoder, batch: Any) -> float:
    """The L1 coefficient at which ``model``'s codes are closest to optimal for the objective
    ``||s D - y||^2 / M + l1 ||s||_1 / N`` (``y``: the input of an SAE, the target of a transcoder, whose skip term
    is in its output): its gradient in an active code vanishes when ``l1 = 2 N / M * (y - y_hat) . d_i``; the
    median over the active codes of the batch."""
    x, target, _ = model.checked_batch(batch)
    y_hat, codes = model(x)
    residual = target - y_hat
    atoms = model.dictionary.atoms
    gradient = 2 * atoms.shape[0] / atoms.shape[1] * residual @ atoms.T
    active = gradient[codes > 0]
    value = float(active.median()) if active.numel() else float("nan")
    if not value > 0:
        raise ValueError("the SAE's codes give no positive L1 coefficient at which they are optimal (no active codes, "
                         "or residuals against the atoms); is it the SAE of these activations?")
    return value


# ---- the built-in candidates ----

def _trained(head: EncoderHead, start: Start, ratio: float) -> Built:
    """A trained head's sweep: k for a top-k head, else a target L0 that tunes its L1 coefficient."""
    head.requires_grad_(True).train()
    if getattr(head, "k", None) is not None:
        return Built(head, {"l1_coeff": 0.0, "lr": start.options.lr}, f"k={head.k}")
    target = ratio * start.l0
    return Built(head, {"l1_coeff": start.l1, "lr": start.options.lr, "target_l0": target}, f"target L0 {target:.1f}")


def _scaled_k(head: EncoderHead, ratio: float) -> int | None:
    return None if getattr(head, "k", None) is None else max(1, round(ratio * head.k))


def _retrained(start: Start, ratio: float) -> Built:
    """The SAE's encoder, built from its config so that a saved copy keeps the new k, trained further."""
    k = _scaled_k(start.head, ratio)
    head = create_encoder(**{**start.head.config(), **({"k": k} if k is not None else {})})
    head.load_state_dict(start.head.state_dict())
    head.to(next(start.head.parameters()).device)
    return _trained(head, start, ratio)


def _has_weights(source: str, head: EncoderHead) -> None:
    if not any(True for _ in head.parameters()):
        raise ValueError(f"{source}: its {head.name!r} encoder has no weights to train further. Leave 'retrained' "
                         "out with --candidates")


def _residual_mlp(start: Start, ratio: float) -> Built:
    """From a BatchTopK SAE: its inference threshold, its L0 by the L1 coefficient."""
    k = _scaled_k(start.head, ratio)
    head = ResidualMLPEncoder.upgrading(start.head, start.options.hidden, k=k if start.head.name == "topk" else None)
    return _trained(head, start, ratio)


def _mlp_source(source: str, head: EncoderHead) -> None:
    if head.name not in ResidualMLPEncoder.sources:
        raise ValueError(f"{source}: its encoder is a {head.name!r} head; the residual MLP starts from a "
                         f"{', '.join(ResidualMLPEncoder.sources)} SAE's. Leave it out with --candidates")


#: the MLP head's learning rate: it starts from scratch (on SmolLM2's quick suite, 1e-4 did best of 1e-4 to 3e-3)
MLP_LR = 1e-4


def _mlp(start: Start, ratio: float) -> Built:
    """The paper's MLP head, from scratch, its L0 by the L1 coefficient."""
    head = create_encoder("mlp", d_model=start.head.d_model, n_latents=start.head.n_latents,
                          hidden=start.options.hidden)
    head.to(next(start.head.parameters(), torch.empty(0)).device)
    built = _trained(head, start, ratio)
    built.model_kwargs["lr"] = MLP_LR
    return built


def _iterative(name: str, start: Start, ratio: float, **options: Any) -> Built:
    """An iterative head that keeps its ``ratio x L0`` largest codes; it only infers."""
    k = max(1, round(ratio * start.l0))
    head = create_encoder(name, d_model=start.head.d_model, n_latents=start.head.n_latents, k=k, **options)
    return Built(head.eval(), {}, f"k={k}")


def _warm(start: Start) -> EncoderHead:
    """A frozen copy of the SAE's encoder, whose codes an iterative head starts from."""
    return copy.deepcopy(start.head).requires_grad_(False).eval()


def _fista(start: Start, ratio: float) -> Built:
    return _iterative("fista", start, ratio, steps=start.options.solver_steps, l1_coeff=start.l1,
                      warm_start=_warm(start))


def _ito(start: Start, ratio: float) -> Built:
    return _iterative("ito", start, ratio, steps=start.options.solver_steps, lr=1e-2, l1_coeff=start.l1,
                      warm_start=_warm(start))


def _matching_pursuit(start: Start, ratio: float) -> Built:
    return _iterative("mp", start, ratio)


register_candidate(Candidate("retrained", "SAE encoder, trained further", True, _retrained, _has_weights))
register_candidate(Candidate("residual_mlp", "residual MLP from the SAE encoder", True, _residual_mlp, _mlp_source))
register_candidate(Candidate("mlp", "MLP head (the paper's), from scratch", True, _mlp))
register_candidate(Candidate("fista", "FISTA from the SAE's codes", False, _fista, amortised=False))
register_candidate(Candidate("mp", "matching pursuit", False, _matching_pursuit, amortised=False))
register_candidate(Candidate("ito", "ITO from the SAE's codes", False, _ito, amortised=False))


class PointKey(NamedTuple):
    """A point of the sweep: a candidate at ``ratio`` x the SAE's L0 (:data:`SOURCE`: the SAE itself)."""

    candidate: str
    ratio: float | None = None

    @property
    def name(self) -> str:
        """Its files' name (``points/NAME.json``, ``models/NAME``), and what seeds its initialisation."""
        return self.candidate if self.ratio is None else f"{self.candidate}@{self.ratio:g}"


SOURCE = PointKey("source")
