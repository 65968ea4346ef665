"""Auto-interpretability on delphi's protocol (EleutherAI's ``delphi``; Paulo et al. 2024): a judge explains each
latent from its activating contexts, then is scored on telling, from the explanation alone, contexts where the latent
fires from contexts where it does not.

* **Examples** (:func:`latent_records`): for each latent, the windows where it fires, split into ``n_quantiles``
  groups of equal size by their peak activation (quantile 0 holds the strongest); the explainer sees ``n_train`` of
  them drawn evenly across the groups, the scorers ``n_test`` others per group, beside ``n_not_active`` windows where
  the latent never fires.
* **Detection**: the judge reads the explanation and a few plain contexts at a time, and says of each whether the
  latent fires in it.
* **Fuzzing**: each context is shown with some tokens marked ``<<like this>>``: in an activating context the tokens at
  or above ``threshold`` times its peak activation, in a non-activating one as many random tokens as an activating
  context has active tokens on average; the judge says whether the marks are on tokens where the latent fires.
* **Score**: each latent's balanced accuracy over the contexts the judge answered (a reply that holds no list of one
  0/1 per context answers none of them), as delphi's ``log/result_analysis.py`` computes it (``compute_confusion``
  and ``compute_classification_metrics``: ``(TP/P + TN/N) / 2``, a class with no answered context counting 0); the
  score is the mean over latents, with its standard error.

A judge too weak to judge gives noise, so :func:`judge_gate` first scores the judge on synthetic latents whose rule is
known (each fires on one frequent token): with the true explanations its detection accuracy must reach
``GATE_TRUE`` (0.75), with the explanations shuffled among the latents it must stay at or under ``GATE_SHUFFLED``
(0.55). A score from a judge that fails the gate is reported as uninformative.

The prompts are sae_zoo's own, written to delphi's protocol; delphi's prompts add few-shot examples.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .judges import Chat, Judge

GATE_TRUE, GATE_SHUFFLED = 0.75, 0.55
LEFT, RIGHT = "<<", ">>"


@dataclass(frozen=True)
class Example:
    """One context: its tokens' text, the latent's activation at each, and its activation group (``quantile``: 0
    the strongest, up to ``n_quantiles - 1``; -1 for a context where the latent does not fire)."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    quantile: int = -1

    @property
    def activating(self) -> bool:
        return self.quantile >= 0

    def text(self, marked: Sequence[int] = ()) -> str:
        """The context's text, the tokens at positions ``marked`` wrapped in ``<<`` ``>>`` (a run of adjacent marked
        tokens in one pair, as delphi marks them)."""
        marked, out, open_ = set(marked), [], False
        for i, token in enumerate(self.tokens):
            if (i in marked) != open_:
                out.append(LEFT if not open_ else RIGHT)
                open_ = not open_
            out.append(token)
        return "".join(out + ([RIGHT] if open_ else []))

    def active_positions(self, threshold: float) -> list[int]:
        """Positions at or above ``threshold`` times the context's peak activation (none where it never fires)."""
        peak = max(self.activations, default=0.0)
        return [i for i, a in enumerate(self.activations) if peak > 0 and a >= threshold * peak]


@dataclass
class LatentRecord:
    """A latent's examples: ``train`` (for the explainer), ``test`` (activating, across the groups) and
    ``not_active``; its ``explanation`` once given."""

    latent: int
    train: list[Example]
    test: list[Example]
    not_active: list[Example]
    explanation: str | None = None


@dataclass
class AutointerpSettings:
    """How many latents and contexts (delphi's defaults where it has them), and how the judge is asked."""

    n_latents: int = 50
    n_quantiles: int = 10
    n_train: int = 20
    n_test: int = 5             # per group: 50 activating contexts, as delphi's default
    n_not_active: int = 50
    examples_per_prompt: int = 5
    threshold: float = 0.3
    max_tokens_explain: int = 60
    seed: int = 0
    gate_latents: int = 50

    def __post_init__(self) -> None:
        for name in ("n_latents", "n_quantiles", "n_train", "n_test", "n_not_active", "examples_per_prompt",
                     "gate_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"autointerp {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"autointerp threshold must be in (0, 1], got {self.threshold}")


def latent_records(codes: Tensor, token_text: Sequence[Sequence[str]], latents: Sequence[int],
                   settings: AutointerpSettings) -> list[LatentRecord]:
    """Each latent's examples from ``codes`` ``(windows, tokens, len(latents))`` (its activations, one column per
    latent) over windows of token texts ``token_text[w][t]``; a latent firing in fewer windows than it needs gets
    what there are."""
    rng = random.Random(settings.seed)
    peaks = codes.amax(1)  # (windows, latents)
    records = []
    for j, latent in enumerate(latents):
        fired = torch.nonzero(peaks[:, j] > 0).flatten()
        order = fired[torch.argsort(peaks[fired, j], descending=True, stable=True)].tolist()
        groups = [order[g * len(order) // settings.n_quantiles:(g + 1) * len(order) // settings.n_quantiles]
                  for g in range(settings.n_quantiles)]
        train, test = [], []
        for g, group in enumerate(groups):
            group = list(group)
            rng.shuffle(group)
            test += [(w, g) for w in group[:settings.n_test]]
            train += [(w, g) for w in group[settings.n_test:]]
        rng.shuffle(train)
        train = sorted(train[:settings.n_train], key=lambda wg: wg[1])  # strongest first
        silent = torch.nonzero(peaks[:, j] <= 0).flatten().tolist()
        not_active = rng.sample(silent, min(settings.n_not_active, len(silent)))

        def example(w: int, quantile: int) -> Example:
            return Example(tuple(token_text[w]), tuple(codes[w, :, j].tolist()), quantile)

        records.append(LatentRecord(latent, [example(w, g) for w, g in train], [example(w, g) for w, g in test],
                                    [example(w, -1) for w in not_active]))
    return records


def explain_chat(record: LatentRecord, threshold: float) -> Chat:
    examples = "\n".join(f"Example {i + 1}: {e.text(e.active_positions(threshold))}"
                         for i, e in enumerate(record.train))
    return [{"role": "system", "content": "You explain what a feature of a language model detects."},
            {"role": "user", "content": "In each example below the feature fires; the tokens where it fires most are "
                                        f"marked {LEFT}like this{RIGHT}.\n\n{examples}\n\nIn a short phrase, what "
                                        "does the feature detect? Reply with the phrase alone."}]


def explain(judge: Judge, records: list[LatentRecord], settings: AutointerpSettings) -> None:
    """Set each record's explanation: the judge's reply to its training examples, on one line."""
    replies = judge.answer_all([explain_chat(r, settings.threshold) for r in records], settings.max_tokens_explain)
    for record, reply in zip(records, replies):
        record.explanation = " ".join(reply.strip().split()) or "(no explanation)"


def scoring_chat(explanation: str, texts: Sequence[str], fuzzing: bool) -> Chat:
    examples = "\n".join(f"Example {i + 1}: {t}" for i, t in enumerate(texts))
    ask = (f"In each example some tokens are marked {LEFT}like this{RIGHT}. For each example, answer 1 if the feature "
           "fires on the marked tokens, else 0." if fuzzing else
           "For each example, answer 1 if the feature fires somewhere in it, else 0.")
    return [{"role": "system", "content": "You judge where a feature of a language model fires, from its "
                                          "description."},
            {"role": "user", "content": f"The feature detects: {explanation}\n\n{examples}\n\n{ask} Reply with a "
                                        f"list of {len(texts)} answers in order, such as "
                                        f"{json.dumps([i % 2 for i in range(len(texts))])}, and nothing else."}]


def parse_answers(reply: str, n: int) -> list[bool] | None:
    """The first ``[...]`` of ``reply`` as ``n`` answers (each 0, 1, true or false), or None (delphi's parse)."""
    match = re.search(r"\[.*?\]", reply, flags=re.S)
    if match is None:
        return None
    try:
        answers = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(answers, list) or len(answers) != n or any(a not in (0, 1) for a in answers):
        return None
    return [bool(a) for a in answers]


def balanced_accuracy(activating: Sequence[bool], predictions: Sequence[bool | None]) -> float:
    """delphi's balanced accuracy over the answered contexts: ``(TP/P + TN/N) / 2``, a class with no answered
    context counting 0."""
    answered = [(a, p) for a, p in zip(activating, predictions) if p is not None]
    pos = sum(a for a, _ in answered)
    neg = len(answered) - pos
    tp = sum(a and p for a, p in answered)
    tn = sum(not a and not p for a, p in answered)
    return ((tp / pos if pos else 0.0) + (tn / neg if neg else 0.0)) / 2


def samples(record: LatentRecord, fuzzing: bool, threshold: float, rng: random.Random) -> list[tuple[str, bool]]:
    """``(text, activating)`` of every context a scorer shows for ``record``, in the order shown (shuffled)."""
    shown = []
    if fuzzing:
        n_marked = math.ceil(sum(sum(a > 0 for a in e.activations) for e in record.test) / max(1, len(record.test)))
        for e in record.not_active:
            positions = list(range(len(e.tokens)))
            shown.append((e.text(rng.sample(positions, min(n_marked, len(positions)))), False))
        shown += [(e.text(e.active_positions(threshold)), True) for e in record.test]
    else:
        shown = [(e.text(), e.activating) for e in (*record.not_active, *record.test)]
    rng.shuffle(shown)
    return shown


def score(judge: Judge, records: list[LatentRecord], settings: AutointerpSettings, fuzzing: bool,
          explanations: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Each latent's balanced accuracy under detection (or ``fuzzing``), with how many of its contexts the judge
    answered; ``explanations`` replace the records' own (the gate's shuffled ones)."""
    rng = random.Random(settings.seed + (1 if fuzzing else 0))
    chats, spans = [], []
    for i, record in enumerate(records):
        explanation = explanations[i] if explanations is not None else record.explanation
        shown = samples(record, fuzzing, settings.threshold, rng)
        per = settings.examples_per_prompt
        batches = [shown[k:k + per] for k in range(0, len(shown), per)]
        spans.append((len(chats), batches))
        chats += [scoring_chat(explanation, [t for t, _ in batch], fuzzing) for batch in batches]
    replies = judge.answer_all(chats, max_tokens=4 * settings.examples_per_prompt + 8)
    results = []
    for record, (first, batches) in zip(records, spans):
        activating, predictions = [], []
        for reply, batch in zip(replies[first:first + len(batches)], batches):
            answers = parse_answers(reply, len(batch)) or [None] * len(batch)
            activating += [a for _, a in batch]
            predictions += answers
        results.append({"latent": record.latent, "balanced_accuracy": balanced_accuracy(activating, predictions),
                        "answered": sum(p is not None for p in predictions), "shown": len(predictions)})
    return results


def prompt_counts(settings: AutointerpSettings, n_latents: int, context_len: int) -> tuple[int, int]:
    """``(prompts, about how many prompt tokens)`` a run asks the judge: the gate's two detection passes, then an
    explanation, a detection and a fuzzing pass per latent (an upper bound: a latent may have fewer contexts)."""
    per = settings.examples_per_prompt
    per_pass = math.ceil((settings.n_test * settings.n_quantiles + settings.n_not_active) / per)
    prompts = 2 * settings.gate_latents * per_pass + n_latents * (1 + 2 * per_pass)
    shown = (2 * settings.gate_latents + 2 * n_latents) * per_pass * per + n_latents * settings.n_train
    return prompts, shown * (context_len + 4) + prompts * 80  # each context, and each prompt's instructions


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


@dataclass
class AutointerpResult:
    """Per latent: its explanation and its detection and fuzzing results; and the judge gate's figures."""

    judge: str
    latents: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"autointerp_judge": self.judge, "autointerp_latents": len(self.latents),
                               **{f"gate_{k}": v for k, v in self.gate.items()}}
        for kind in ("detection", "fuzzing"):
            values = [r[kind]["balanced_accuracy"] for r in self.latents if kind in r]
            if values:
                out[f"autointerp_{kind}"], out[f"autointerp_{kind}_se"] = mean_and_se(values)
                answered = sum(r[kind]["answered"] for r in self.latents if kind in r)
                out[f"autointerp_{kind}_answered"] = answered / sum(r[kind]["shown"] for r in self.latents if kind in r)
        out["autointerp_informative"] = bool(self.gate.get("passed", False))
        return out


def judge_gate(judge: Judge, token_ids: Tensor, token_text: Sequence[Sequence[str]], vocab_text: dict[int, str],
               settings: AutointerpSettings) -> dict[str, Any]:
    """The judge's detection accuracy on synthetic latents of known rule: each fires (activation 1) on one of the
    ``gate_latents`` most frequent tokens of the windows ``token_ids`` ``(windows, tokens)`` that occur in enough
    windows and miss enough; scored with the true explanations and with them shuffled among the latents."""
    present = torch.zeros(len(token_ids), max(vocab_text) + 1, dtype=torch.bool)
    present.scatter_(1, token_ids, True)
    in_windows = present.sum(0)
    needed = settings.n_test * settings.n_quantiles
    usable = [t for t in torch.argsort(in_windows, descending=True, stable=True).tolist()
              if needed <= in_windows[t] <= len(token_ids) - settings.n_not_active and vocab_text.get(t, "").strip()]
    rules = usable[:settings.gate_latents]
    if len(rules) < 2:
        raise ValueError(f"autointerp: the gate needs tokens in at least {needed} of the {len(token_ids)} windows, and "
                         f"absent from {settings.n_not_active}; read more text")
    codes = torch.stack([(token_ids == t).float() for t in rules], dim=-1)
    records = latent_records(codes, token_text, rules, settings)
    true = [f'the token "{vocab_text[t].strip()}"' for t in rules]
    shuffled = true[1:] + true[:1]  # each latent gets another's rule
    scored = score(judge, records, settings, False, true) + score(judge, records, settings, False, shuffled)
    (true_mean, true_se), (shuffled_mean, shuffled_se) = (
        mean_and_se([r["balanced_accuracy"] for r in half]) for half in (scored[:len(rules)], scored[len(rules):]))
    return {"latents": len(rules), "true": true_mean, "true_se": true_se, "shuffled": shuffled_mean,
            "shuffled_se": shuffled_se, "answered": sum(r["answered"] for r in scored) / sum(r["shown"] for r in scored),
            "passed": true_mean >= GATE_TRUE and shuffled_mean <= GATE_SHUFFLED}
