"""``sae-zoo evaluate``: named evaluations of one SAE (or transcoder) on language-model data, as SAEBench runs them,
written as ``evaluation.json`` (every figure) and ``evaluation.md`` (a readable report).

A source is a sae_zoo run folder (measured on its recipe's data, the report written into it), a saved folder or a
catalogue entry (``release/id``; the LM and hook from its metadata, or given; the report written into ``--out``).
Each eval is a registered function ``(model, datamodule, settings) -> figures``:

* ``core``: FVU (with and without the outlier tokens), MSE, L0, L1 and dead latents; CE-loss recovered and the KL
  score against zero and mean ablation; cosine similarity, L2 ratio and relative reconstruction bias; each with its
  standard error. ``every_position`` splices BOS and the outlier tokens too, as SAEBench's core does.
* ``probing``: k-sparse probing of the mean-pooled codes against the dense probe
  (:class:`~sae_zoo.evaluation.ProbingConfig`).
* ``absorption``: feature absorption on SAEBench's first-letter task (:mod:`sae_zoo.evaluation.absorption`): its
  ground-truth letter probe and gate, k-sparse probing for each letter's latents, the mean absorption fraction and
  full-absorption rate over the letters, per letter too.
* ``autointerp``: auto-interpretability on delphi's protocol, by a pluggable judge, behind a judge gate
  (:mod:`sae_zoo.evaluation.autointerp`): explanations of ``n_latents`` latents, their detection and fuzzing
  balanced accuracy, and the gate's figures; where the judge fails the gate, the report says the score is
  uninformative and does not print it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_json, atomic_write_text
from .data.base import LanguageModelData
from .data.windows import columns, encode_windows, read_windows, token_text
from .evaluation import ProbingConfig, ce_spliced, held_out_pass, probe_tallies
from .evaluation.absorption import QUICK_WORDS, AbsorptionSettings, datamodule_absorption
from .evaluation.autointerp import (AutointerpResult, AutointerpSettings, explain, judge_gate, latent_records,
                                    prompt_counts, score)
from .evaluation.judges import Judge, create_judge
from .evaluation.probing import probing_figures
from .model import SparseCoder
from .sources import SourceData, checked_datamodule, data_config, is_run_folder, load_source, probing_config

#: the evaluations by name: ``(model, datamodule, settings) -> figures``
EVALS: dict[str, Callable[[SparseCoder, LanguageModelData, EvalSettings], dict[str, Any]]] = {}


@dataclass
class EvalSettings:
    """How the evals run: ``every_position`` (core: edit BOS and the outlier tokens too, SAEBench's way) and
    ``probing`` (its settings; None: the defaults)."""

    every_position: bool = False
    probing: ProbingConfig | None = None
    judge: str | Judge | None = None
    autointerp: AutointerpSettings | None = None
    latents: list[int] | None = None
    contexts: int = 1024
    context_len: int = 32
    absorption: AbsorptionSettings | None = None
    gate: dict[str, Any] | None = None  # the judge gate's figures, once measured: every model shares the judge

    @classmethod
    def quick(cls, **kwargs: Any) -> EvalSettings:
        """Smaller absorption and autointerp runs (minutes on a CPU): ``QUICK_WORDS`` words, 10 latents scored on
        2 contexts a group and 20 silent ones, a gate of 10 synthetic latents."""
        return cls(absorption=AbsorptionSettings(words=QUICK_WORDS),
                   autointerp=AutointerpSettings(n_latents=10, gate_latents=10, n_test=2, n_not_active=20), **kwargs)


def register_eval(name: str):
    """Function decorator: register an eval under ``name`` (``--evals NAME``)."""

    def decorate(fn):
        if name in EVALS and EVALS[name] is not fn:
            raise ValueError(f"an eval named {name!r} is already registered")
        EVALS[name] = fn
        return fn

    return decorate


def parse_evals(names: str | Sequence[str]) -> tuple[str, ...]:
    """``"core,probing"`` (or a list) as registered eval names, each once; an unknown one is refused by name."""
    listed = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in listed if n not in EVALS]
    if unknown or not listed:
        raise ValueError(f"--evals: {', '.join(map(repr, unknown)) or 'none given'}; the evals are "
                         f"{', '.join(sorted(EVALS))}")
    return tuple(dict.fromkeys(listed))


@register_eval("core")
def core(model: SparseCoder, datamodule: LanguageModelData, settings: EvalSettings) -> dict[str, Any]:
    evaluation = held_out_pass(model, datamodule)
    evaluation.ce = ce_spliced(model, datamodule, every_position=settings.every_position)
    return evaluation.figures()


@register_eval("probing")
def probing(model: SparseCoder, datamodule: LanguageModelData, settings: EvalSettings) -> dict[str, Any]:
    return probing_figures(probe_tallies(model, datamodule, settings.probing or ProbingConfig()))


@register_eval("absorption")
def absorption(model: SparseCoder, datamodule: LanguageModelData, settings: EvalSettings) -> dict[str, Any]:
    return datamodule_absorption(model, datamodule, settings.absorption)


@register_eval("autointerp")
def autointerp(model: SparseCoder, datamodule: LanguageModelData, settings: EvalSettings) -> dict[str, Any]:
    s = settings.autointerp or AutointerpSettings()
    judge = settings.judge if isinstance(settings.judge, Judge) else create_judge(settings.judge)
    windows = read_windows(datamodule, "autointerp", datamodule.documents(), per_document=4,
                           context_len=settings.context_len, limit=settings.contexts)
    codes, outliers = encode_windows(model, windows, datamodule.scale, datamodule.outlier_norm)
    offset = windows.tokens.shape[1] - windows.activations.shape[1]  # BOS, left out of the activations
    ids = windows.tokens[:, offset:]
    _, tokenizer, _ = datamodule.language_model()
    vocab = {t: token_text(tokenizer, t) for t in torch.unique(windows.tokens).tolist()}
    text = [[vocab[t] for t in row] for row in ids.tolist()]
    latents = settings.latents or choose_latents(codes, outliers.shape, s)
    prompts, tokens = prompt_counts(s, len(latents), settings.context_len)
    print(f"autointerp: judge {judge.name}; {len(latents)} latents; {prompts} prompts, about {tokens:,} prompt "
          "tokens", flush=True)
    result = AutointerpResult(judge.name)
    if settings.gate is None:
        settings.gate = judge_gate(judge, ids, text, vocab, s)
    result.gate = settings.gate
    records = latent_records(columns(codes, latents, outliers.shape), text, latents, s)
    explain(judge, records, s)
    detection, fuzzing = score(judge, records, s, fuzzing=False), score(judge, records, s, fuzzing=True)
    result.latents = [{"latent": r.latent, "explanation": r.explanation, "detection": d, "fuzzing": f}
                      for r, d, f in zip(records, detection, fuzzing)]
    return {**result.figures(), "autointerp_per_latent": result.latents}


def choose_latents(codes: Any, shape: Any, s: AutointerpSettings) -> list[int]:
    """``s.n_latents`` latents drawn with ``s.seed`` from those that fire in at least ``s.n_quantiles`` windows (one
    per activation group); pass the same ``latents`` to compare encoders on one decoder latent for latent."""
    window = codes.indices()[0] // shape[1]
    live = codes.values() > 0
    pairs = torch.unique(torch.stack([window[live], codes.indices()[1][live]]), dim=1)
    counts = torch.bincount(pairs[1], minlength=codes.shape[1])
    eligible = torch.nonzero(counts >= s.n_quantiles).flatten()
    if len(eligible) == 0:
        raise ValueError(f"autointerp: no latent fires in {s.n_quantiles} or more of the windows read; read more "
                         "contexts")
    generator = torch.Generator().manual_seed(s.seed)
    return sorted(eligible[torch.randperm(len(eligible), generator=generator)[:s.n_latents]].tolist())


def run_evals(model: SparseCoder, datamodule: LanguageModelData, names: Sequence[str], settings: EvalSettings,
              progress: bool = True) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """``(figures, seconds)`` of each of the evals ``names`` (checked with :func:`parse_evals`) of ``model``."""
    figures: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for i, name in enumerate(names):
        if progress:
            print(f"== [{i + 1}/{len(names)}] {name} ==", flush=True)
        start = time.perf_counter()
        figures[name] = EVALS[name](model, datamodule, settings)
        seconds[name] = round(time.perf_counter() - start, 1)
    return figures, seconds


def prepare_judge(names: Sequence[str], settings: EvalSettings, cache_dir: Path) -> None:
    """Load (or reach) the judge before anything runs when autointerp is among ``names``: a judge that cannot be
    loaded or does not answer is named first."""
    if "autointerp" in names and not isinstance(settings.judge, Judge):
        settings.judge = create_judge(settings.judge, cache_dir=cache_dir)


def evaluate_source(source: str | Path, evals: str | Sequence[str] = ("core",), out: str | Path | None = None,
                    settings: EvalSettings | None = None, data: SourceData | None = None,
                    progress: bool = True) -> Path:
    """Run ``evals`` on ``source`` and write ``evaluation.json`` and ``evaluation.md`` into ``out`` (a run folder's
    own by default); returns that folder. Every check (the eval names, the source, its data, the output folder) is
    made before any eval runs."""
    names = parse_evals(evals)
    settings, data = settings or EvalSettings(), data or SourceData()
    if out is None:
        if not is_run_folder(source):
            raise ValueError(f"{source} is not a sae_zoo run folder: give --out DIR for the evaluation's files")
        out = source
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    prepare_judge(names, settings, out / "judge_cache")
    sae, recipe = load_source(source)
    datamodule = checked_datamodule(str(source), sae, data_config(str(source), sae, recipe, data))
    if settings.probing is None and "probing" in names:
        settings.probing = probing_config(recipe, data) or ProbingConfig()
    model = sae.model()
    datamodule.prepare_data()
    figures, seconds = run_evals(model, datamodule, names, settings, progress)
    record = {"source": str(source), "sae_zoo_version": version("sae_zoo"), "evals": list(names),
              "every_position": settings.every_position, "data": datamodule.describe(), "seconds": seconds,
              "figures": figures}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "evaluation.json", record)
    atomic_write_text(out / "evaluation.md", report(record))
    return out


#: the report's rows: (figure, label, format); a figure's ``_se`` follows it where measured
REPORT_ROWS = {
    "core": [("fvu", "FVU", "{:.4f}"), ("fvu_with_outliers", "FVU, all tokens", "{:.4f}"), ("l0", "L0", "{:.1f}"),
             ("dead_latents", "dead fraction", "{:.3f}"), ("ce_loss_recovered", "CE-loss recovered", "{:.3f}"),
             ("ce_loss_recovered_vs_mean", "CE-loss recovered (vs mean)", "{:.3f}"),
             ("kl_div_score", "KL score", "{:.3f}"), ("kl_div_score_vs_mean", "KL score (vs mean)", "{:.3f}"),
             ("cossim", "cosine similarity", "{:.3f}"), ("l2_ratio", "L2 ratio", "{:.3f}"),
             ("relative_reconstruction_bias", "relative reconstruction bias", "{:.3f}")],
}


def autointerp_report(figures: dict[str, Any]) -> list[str]:
    """The judge gate's figures, then the score, or where the judge failed the gate, why there is none."""
    gate = (f"judge gate ({figures['gate_latents']} synthetic latents of known rule): detection "
            f"{figures['gate_true']:.3f} ± {figures['gate_true_se']:.3f} with the true explanations (needs >= 0.75), "
            f"{figures['gate_shuffled']:.3f} ± {figures['gate_shuffled_se']:.3f} with them shuffled (needs <= 0.55); "
            f"{figures['gate_answered']:.0%} of its contexts answered: "
            + ("passed" if figures["gate_passed"] else "FAILED"))
    lines = [f"| judge | {figures['autointerp_judge']} |", f"| {gate.split(':', 1)[0]} | {gate.split(':', 1)[1]} |"]
    if not figures["autointerp_informative"]:
        return lines + ["", f"The judge failed its gate, so its scores of the {figures['autointerp_latents']} "
                        "latents are uninformative and are not reported here (evaluation.json keeps them, marked "
                        "autointerp_informative: false). Use a stronger judge (--judge URL#MODEL)."]
    for kind in ("detection", "fuzzing"):
        lines.append(f"| {kind} (balanced accuracy, {figures['autointerp_latents']} latents) | "
                     f"{figures[f'autointerp_{kind}']:.3f} ± {figures[f'autointerp_{kind}_se']:.3f} |")
    return lines


def absorption_report(figures: dict[str, Any]) -> list[str]:
    """SAEBench's gate (enough letters whose ground-truth probe reaches F1 > 0.6), then the absorption figures, or
    where the gate failed, why they say little."""
    passing = figures["absorption_probe_letters_passing"]
    lines = [f"| letters whose probe reaches F1 > 0.6 (SAEBench's gate needs 20) | {passing} of 26: "
             + ("passed" if figures["absorption_gate_passed"] else "FAILED") + " |",
             f"| mean probe F1 | {figures['absorption_probe_f1']:.3f} |",
             f"| letters counted (probe passing, a word right) | {figures['absorption_letters']} |"]
    lines += table_rows(figures, [("mean_absorption_fraction_score", "mean absorption fraction", "{:.4f}"),
                                  ("mean_full_absorption_score", "mean full absorption", "{:.4f}"),
                                  ("mean_num_split_features", "latents per letter (split features)", "{:.2f}")])
    if not figures["absorption_gate_passed"]:
        lines += ["", "Too few letters are linearly decodable at this hook for SAEBench to report absorption; the "
                  "figures above are over the letters that are, and say little."]
    return lines


def table_rows(figures: dict[str, Any], rows: list[tuple[str, str, str]] | None) -> list[str]:
    """``| label | value ± se |`` for each of ``rows`` (default: every float figure) that was measured."""
    rows = rows or [(key, key, "{:.4f}") for key, value in figures.items()
                    if not key.endswith("_se") and isinstance(value, float)]
    lines = []
    for key, label, fmt in rows:
        if key in figures:
            se = figures.get(f"{key}_se")
            lines.append(f"| {label} | {fmt.format(figures[key])}"
                         + (f" ± {fmt.format(se)}" if isinstance(se, float) else "") + " |")
    return lines


def report(record: dict[str, Any]) -> str:
    """``evaluation.md``: each eval's figures as a table, with standard errors."""
    lines = [f"# Evaluation of {record['source']}", "",
             f"sae_zoo {record['sae_zoo_version']}; data: " + ", ".join(f"{k} {v}" for k, v in record["data"].items()
                                                                       if v not in (None, "", {})), ""]
    for name, figures in record["figures"].items():
        lines += [f"## {name} ({record['seconds'][name]} s)", "", "| figure | value |", "|---|---|"]
        special = {"autointerp": autointerp_report, "absorption": absorption_report}
        lines += special[name](figures) if name in special else table_rows(figures, REPORT_ROWS.get(name))
        if name == "core":
            lines += ["", "CE-loss recovered and the KL score were measured with "
                      + ("every position spliced (SAEBench's)." if record["every_position"] else
                         "BOS and the outlier tokens keeping their own activations (sae_zoo's default; "
                         "--every-position splices them too, as SAEBench does).")]
        lines.append("")
    return "\n".join(lines) + ("\n± is one standard error: over held-out contexts by bootstrap for core, over documents "
                               "for probing, over latents for autointerp, over letters for absorption.\n")
