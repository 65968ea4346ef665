"""Held-out reconstruction on language-model activations, with the outlier tokens counted apart and
standard errors by bootstrap over contexts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.activations import select
from ..data.base import LanguageModelData, SparseCodingData, move, split_batch
from ..families import create_family
from ..metrics import SparseCodingMetrics
from ..metrics.functional import _fvu_compute
from ..model import Reconstruction, SparseCoder
from .bootstrap import bootstrap_se


@dataclass
class ContextSums:
    """Per held-out context (float64): the summed squared error, the token count, the summed ``||x||^2`` and the
    summed ``x``: the sufficient statistics of FVU for any weighting of the contexts (bootstrap resamples
    included); and those of SAEBench's core (SAELens's ``evals.py``) shape figures: the summed cosine of each
    token's reconstruction to it (``cos``), the summed ``||x_hat|| / ||x||`` (``l2_ratio``), the summed
    ``x . x_hat`` (``dot``) and ``||x_hat||^2`` (``hat_sq``). Sums saved before these were kept lack them (None)."""

    sse: Tensor      # (contexts,)
    tokens: Tensor   # (contexts,)
    sum_sq: Tensor   # (contexts,)
    sum_x: Tensor    # (contexts, d)
    cos: Tensor | None = None        # (contexts,)
    l2_ratio: Tensor | None = None   # (contexts,)
    dot: Tensor | None = None        # (contexts,)
    hat_sq: Tensor | None = None     # (contexts,)

    @classmethod
    def zeros(cls, n_contexts: int, d_model: int) -> ContextSums:
        sums = [torch.zeros(n_contexts, dtype=torch.float64) for _ in range(7)]
        return cls(*sums[:3], torch.zeros(n_contexts, d_model, dtype=torch.float64), *sums[3:])

    def add(self, context: Tensor, x: Tensor, x_hat: Tensor) -> None:
        """Add tokens ``x`` (float64, ``(n, d)``) of contexts ``context`` and their reconstructions ``x_hat``."""
        norm, hat_norm, dot = x.norm(dim=-1), x_hat.norm(dim=-1), (x * x_hat).sum(-1)
        values = {"sse": (x - x_hat).square().sum(-1), "tokens": torch.ones(len(x), dtype=torch.float64),
                  "sum_sq": norm.square(), "sum_x": x,
                  # SAELens's: a norm under 1e-4 divides as 1 in the ratio; a zero vector has cosine 0 here
                  "cos": dot / (norm * hat_norm).clamp_min(1e-30),
                  "l2_ratio": hat_norm / torch.where(norm < 1e-4, 1.0, norm),
                  "dot": dot, "hat_sq": hat_norm.square()}
        for name, value in values.items():
            getattr(self, name).index_add_(0, context, value)

    def shape_figures(self, weights: Tensor) -> dict[str, Tensor] | None:
        """SAEBench's core shape figures of the contexts weighted by ``weights``: the mean cosine similarity of a
        reconstruction to its token (``cossim``), the mean ratio of their norms (``l2_ratio``), and the relative
        reconstruction bias ``E||x_hat||^2 / E[x . x_hat]`` (Wright and Sharkey's; 1: unbiased, below 1: shrunk),
        here over all held-out tokens at once; None where the sums lack them."""
        if self.cos is None:
            return None
        tokens = weights @ self.tokens
        return {"cossim": (weights @ self.cos) / tokens, "l2_ratio": (weights @ self.l2_ratio) / tokens,
                "relative_reconstruction_bias": (weights @ self.hat_sq) / (weights @ self.dot)}

    @property
    def n_contexts(self) -> int:
        return len(self.tokens)

    def fvu(self, weights: Tensor) -> Tensor:
        """FVU of the contexts weighted by ``weights`` (``(..., contexts)``): the metrics package's FVU
        (:class:`~sae_zoo.metrics.FVU`) of the weighted sums."""
        return _fvu_compute(weights @ self.sse, weights @ self.sum_x, weights @ self.sum_sq, weights @ self.tokens)


@dataclass
class TokenSums:
    """:class:`ContextSums` of the ``clean`` held-out tokens (the outliers left out, as the data leave them out)
    and of ``every`` one, and the scaled norm above which a token is an outlier (None: no outliers)."""

    clean: ContextSums
    every: ContextSums
    outlier_norm: float | None = None

    def figures(self) -> dict[str, float]:
        """FVU without the outlier tokens (what the test metrics report) and with them, each with its standard
        error over contexts; how many held-out tokens are outliers and the norm that makes one."""
        n_contexts = self.every.n_contexts
        ones = torch.ones(n_contexts, dtype=torch.float64)
        out = {"held_out_tokens": int(self.every.tokens.sum()),
               "outlier_tokens": int(self.every.tokens.sum() - self.clean.tokens.sum())}
        for sums, suffix in ((self.clean, ""), (self.every, "_with_outliers")):
            out[f"fvu{suffix}"] = float(sums.fvu(ones))
            out[f"fvu{suffix}_se"] = bootstrap_se(sums.fvu, n_contexts)
        for name, value in (self.clean.shape_figures(ones) or {}).items():
            out[name] = float(value)
            out[f"{name}_se"] = bootstrap_se(lambda w, name=name: self.clean.shape_figures(w)[name], n_contexts)
        if self.outlier_norm is not None:
            out["outlier_norm"] = float(self.outlier_norm)
        return out


def check_pairing(model: SparseCoder, datamodule: SparseCodingData) -> None:
    """Refuse data that ``model``'s family cannot be scored on (:meth:`ModelFamily.check_data`; a module without
    a family is scored as a transcoder where it says it is one, ``transcoder = True``, else as an SAE)."""
    family = getattr(model, "family", None)
    family = family or create_family("transcoder" if getattr(model, "transcoder", False) else "sae")
    family.check_data(datamodule)


@torch.no_grad()
def token_sums(model: SparseCoder, datamodule: LanguageModelData,
               metrics: SparseCodingMetrics | None = None) -> TokenSums:
    """The model's :class:`TokenSums` over the held-out tokens (its targets: a transcoder's are the paired
    targets), and, in the same pass, the clean tokens added to ``metrics`` (the model's test metrics) if given.
    The caller sets the model's mode (:func:`~sae_zoo.evaluation.held_out_pass` evaluates it in eval mode)."""
    check_pairing(model, datamodule)
    rows, per_context = datamodule.held_out_rows(), datamodule.tokens_per_context
    n_contexts = -(-datamodule.held_out_tokens // per_context)
    sums = TokenSums(*(ContextSums.zeros(n_contexts, datamodule.d_out) for _ in range(2)), datamodule.outlier_norm)
    start = 0
    for batch in rows:
        x, target, _ = split_batch(batch)
        context = torch.arange(start, start + len(x)) // per_context
        start += len(x)
        on_device = x.to(model.device)
        out = model(on_device)
        clean = ~rows.outliers(batch)
        if metrics is not None:
            keep = clean.to(model.device)
            model.update_metrics(metrics, move(select(batch, clean), model.device),
                                 Reconstruction(out.x_hat[keep], out.codes[keep]))
        x_hat, target = out.x_hat.double().cpu(), target.double()
        sums.clean.add(context[clean], target[clean], x_hat[clean])
        sums.every.add(context, target, x_hat)
    return sums
