"""An upgrade's run: the source SAE and its data, the checks made before any long work, the candidates
trained together and every point measured, resumably."""

from __future__ import annotations

import dataclasses
import json
import logging
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

from .. import flops
from .._io import atomic_write, atomic_write_json
from ..data.base import LanguageModelData
from ..evals import EvalSettings, parse_evals, prepare_judge
from ..evaluation import CELosses, Evaluation, ProbingConfig, ce_baselines, evaluate_model
from ..hub import PretrainedSAE
from ..metrics import Scoring
from ..model import SparseCoder
from ..multihead import HeadBank
from ..recipe import make_trainer
from ..sources import checked_datamodule, data_config, load_source, probing_config
from ..data.base import move
from .candidates import CANDIDATES, SOURCE, Built, PointKey, Start, check_candidates, default_candidates, stationary_l1
from .evaluations import evals_section, evaluate_points
from .report import Points, evaluation_file, probe_keys, read_evaluation, write_cards, write_comparison

log = logging.getLogger(__name__)

#: the figures each point records (``points/NAME.json``), beside its probing accuracies and timing
POINT_FIGURES = ("l0", "dead_latents", "fvu", "fvu_se", "fvu_with_outliers", "ce_loss_recovered",
                 "ce_loss_recovered_se")


@dataclass
class UpgradeOptions:
    """What an upgrade runs. ``model``, ``hook``, ``hook_out`` (a transcoder's target), ``gguf_file`` and ``steps``
    left ``None`` come from the source (its metadata, or its run's recipe); ``candidates`` left ``None`` are every
    registered one (:data:`~sae_zoo.upgrade.CANDIDATES`; for a transcoder, the amortised ones); ``ratios`` and
    ``solver_steps`` have smaller defaults when ``quick``, which also gives a checkpoint's upgrade less data.
    ``data``: ``data.KEY=VALUE`` overrides."""

    model: str | None = None
    hook: str | None = None
    hook_out: str | None = None
    gguf_file: str | None = None
    candidates: tuple[str, ...] | None = None
    ratios: tuple[float, ...] | None = None     # (0.5, 0.7, 1, 1.4, 2); quick (0.7, 1, 1.4)
    steps: int | None = None                    # the run's; else 10,000, quick 600
    lr: float = 1e-3
    hidden: int = 1024
    solver_steps: int | None = None             # 200; quick 50
    seed: int = 0
    data: tuple[str, ...] = ()
    quick: bool = False
    probing: bool = True                        # k-sparse probing of every point (the run's settings, if a run)
    evals: tuple[str, ...] = ()                 # named evals of the SAE and each candidate's point nearest its L0
    eval_settings: EvalSettings | None = None   # their settings (None: the defaults; quick: EvalSettings.quick())

    def __post_init__(self) -> None:
        if self.ratios is None:
            self.ratios = (0.7, 1.0, 1.4) if self.quick else (0.5, 0.7, 1.0, 1.4, 2.0)
        if self.solver_steps is None:
            self.solver_steps = 50 if self.quick else 200
        unknown = [c for c in self.candidates or () if c not in CANDIDATES]
        if unknown or self.candidates == ():
            raise ValueError(f"candidates: {', '.join(unknown) or 'none given'}; choose from {', '.join(CANDIDATES)}")
        if not self.ratios or min(self.ratios) <= 0:
            raise ValueError(f"ratios must be positive multiples of the SAE's L0, got {list(self.ratios)}")
        for name in ("steps", "hidden", "solver_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.evals:
            self.evals = parse_evals(self.evals)


# ---- the sweep ----

def measure(model: SparseCoder, datamodule: LanguageModelData, baselines: CELosses,
            probing: ProbingConfig | None = None) -> tuple[dict[str, Any], Evaluation]:
    """One model's held-out figures (L0 and dead latents, FVU with its standard error and with the outlier
    tokens, CE-loss recovered, inference FLOPs per token, and k-sparse probing accuracies unless ``probing``
    is None), and its :class:`~sae_zoo.evaluation.Evaluation`, from which the standard error of its difference
    to another model on the same held-out data follows."""
    start = time.perf_counter()
    evaluation = evaluate_model(model, datamodule, probing or ProbingConfig(enabled=False), baselines)
    figures = evaluation.figures()
    point = {k: figures[k] for k in POINT_FIGURES}
    point["inference_flops"] = flops.inference_flops(model.encoder)
    point.update((k, v) for k, v in figures.items() if k.startswith("probe_"))
    point["seconds"] = round(time.perf_counter() - start, 1)
    return point, evaluation


def check_out_dir(out: Path, identity: dict[str, Any]) -> None:
    """A new or empty folder starts an upgrade; a folder of the same upgrade resumes it; anything else is refused."""
    record = out / "upgrade.json"
    if record.is_file():
        previous = json.loads(record.read_text()).get("identity", {})
        if previous != identity:
            differ = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(f"{out} holds another upgrade (it differs in {', '.join(differ)}); resume it with the "
                             "same source and options, or choose another --out")
        log.info("resuming the upgrade in %s", out)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and holds no upgrade.json: choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"identity": identity, "sae_zoo_version": version("sae_zoo")})


def _seed(key: PointKey, seed: int) -> int:
    return zlib.crc32(f"{seed}:{key.name}".encode())


def train_candidates(built: dict[PointKey, Built], sae: PretrainedSAE, datamodule: LanguageModelData, out: Path,
                     steps: int, progress: bool) -> None:
    """Train the candidates not yet saved under ``out/models`` together, from one pass over the activations,
    and save each (atomically)."""
    todo = [k for k in built if not (out / "models" / k.name / "model.safetensors").is_file()]
    if not todo:
        return
    models = {k.name: coder(sae, built[k].head, **built[k].model_kwargs).train() for k in todo}
    log.info("training %d heads on the frozen decoder from one pass over the activations (%d steps): %s",
             len(todo), steps, ", ".join(models))
    trainer = make_trainer({"max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                            "log_every_n_steps": max(1, min(50, steps // 10))},
                           logger=CSVLogger(out, name="logs", version=""), progress=progress)
    start = time.perf_counter()
    with warnings.catch_warnings():  # the bank has no validation step, and the frozen decoder may be in eval mode
        warnings.filterwarnings("ignore", message=".*val_dataloader.*|.*in eval mode at the start of training.*")
        trainer.fit(HeadBank(models), datamodule=datamodule)
    seconds = time.perf_counter() - start
    tokens = steps * datamodule.hparams.batch_size
    log.info("trained in %.0f s: %s tokens read once for %d heads (%s tokens/s, %s head-tokens/s)", seconds,
             f"{tokens:,}", len(todo), f"{tokens / seconds:,.0f}", f"{len(todo) * tokens / seconds:,.0f}")
    for name, model in models.items():
        model.eval().save_pretrained(out / "models" / name)


def coder(sae: PretrainedSAE, head: Any, **kwargs: Any) -> SparseCoder:
    """``head`` on the source's frozen decoder (and a transcoder's frozen skip term), in eval mode: what every
    point of the upgrade measures."""
    return sae.model(head, scoring=Scoring(code_recovery=False), frozen_skip=True, **kwargs)


def upgrade(source: str | Path, out: str | Path | None = None, options: UpgradeOptions | None = None,
            progress: bool = True) -> Path:
    """Upgrade the SAE (or transcoder) ``source`` (see :mod:`sae_zoo.upgrade`); returns the output folder."""
    options = options or UpgradeOptions()
    source = str(source)
    sae, recipe = load_source(source)
    if sae.encoder is None:
        raise ValueError(f"{source}: no sae_zoo head reproduces its encoder ({sae.encoder_unavailable}), so there is "
                         "no SAE to compare against")
    if options.candidates is None:
        options = dataclasses.replace(options, candidates=default_candidates(sae.transcoder))
    check_candidates(source, sae.encoder, options.candidates, sae.transcoder)
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
    settings = options.eval_settings or (EvalSettings.quick() if options.quick else EvalSettings())
    prepare_judge(options.evals, settings, out / "judge_cache")
    datamodule.prepare_data()

    device = datamodule.device  # every model is measured there (the bank's trainer picks its own)
    sae.dictionary.requires_grad_(False)
    source_model = coder(sae, sae.encoder.requires_grad_(False)).to(device)
    baselines = ce_baselines(datamodule)
    points: Points = {}
    (out / "points").mkdir(exist_ok=True)

    def record(key: PointKey, knob: str, model: SparseCoder) -> None:
        path = out / "points" / f"{key.name}.json"
        if path.is_file() and evaluation_file(out, key).is_file():
            points[key] = json.loads(path.read_text())
            return
        figures, evaluation = measure(model.to(device), datamodule, baselines, probing)
        label = CANDIDATES[key.candidate].label if key != SOURCE else "the SAE's own encoder"
        point = {"candidate": key.candidate, "label": label, "ratio": key.ratio, "knob": knob, **figures}
        atomic_write(evaluation_file(out, key), lambda tmp: torch.save(evaluation.state(), tmp))
        atomic_write_json(path, point)  # last: a point with its .json is complete
        points[key] = point
        log.info("  %-36s %-16s L0 %7.1f  FVU %.4f  CE recovered %.4f  (%.0f s)", point["label"], knob, point["l0"],
                 point["fvu"], point["ce_loss_recovered"], point["seconds"])

    record(SOURCE, "-", source_model)
    l0 = points[SOURCE]["l0"]
    log.info("the SAE: L0 %.1f; candidates at %s x its L0", l0, ", ".join(f"{r:g}" for r in options.ratios))

    def l1() -> float:  # only a candidate that tunes an L1 coefficient needs it (a top-k sweep does not)
        value = stationary_l1(source_model, move(next(iter(datamodule.held_out_batches())), device))
        log.info("the L1 coefficient at which the SAE's codes are closest to optimal: %.4g", value)
        return value

    start, built = Start(sae.encoder, l0, l1, options), {}
    for candidate in options.candidates:
        for ratio in options.ratios:
            key = PointKey(candidate, ratio)
            torch.manual_seed(_seed(key, options.seed))
            built[key] = CANDIDATES[candidate].build(start, ratio)
    L.seed_everything(options.seed, verbose=False)
    train_candidates({k: b for k, b in built.items() if CANDIDATES[k.candidate].trains}, sae, datamodule, out,
                     steps, progress)
    measured = {}
    for key, (head, _, knob) in built.items():
        if CANDIDATES[key.candidate].trains:
            model = SparseCoder.from_pretrained(out / "models" / key.name)
        else:
            model = coder(sae, head)
        record(key, knob, model)
        measured[key] = model

    evaluated = {}
    if options.evals:  # the named evals of the SAE and of each candidate's point nearest its L0
        log.info("evals %s of the SAE's encoder and of each candidate at its L0", ", ".join(options.evals))
        evaluated = evaluate_points(out, points, {SOURCE: source_model, **measured}, datamodule, options.evals,
                                    settings, progress)
    source_evaluation = read_evaluation(out, SOURCE)  # read once: the gains, the tables and the cards use it
    log.info("%s", write_comparison(out, source, points, options.candidates, source_evaluation,
                                    evals_section(points, evaluated) if evaluated else ""))
    write_cards(out, source, points, measured, probe_keys(source_evaluation))
    return out


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"--ratios: {text!r} is not a comma-separated list of numbers") from None
