"""The ``sae-zoo`` command: ``fit`` a recipe, ``upgrade`` an existing SAE, ``list`` encoder heads, run the
``demo``, write a model ``card``, ``push`` a run to the Hugging Face Hub, ``export`` it to SAELens's format."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .encoders import get_encoder_class, list_encoders
from .evaluation.absorption import QUICK_WORDS
from .report import print_table

#: The paper's known-dictionary test MCC (N=16, M=8, K=3; mean and std over five model seeds) by
#: (head, MLP hidden width).
PAPER_KNOWN_DICTIONARY = {("linear", None): (0.609, 0.038), ("mlp", 32): (0.781, None), ("mlp", 256): (0.818, 0.113)}


class _CurrentStdout(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is when a record comes (a test may have replaced it)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _show_progress() -> None:
    """What the library logs (logger ``sae_zoo``: progress, the upgrade's tables) is what the command shows, as
    plain lines on standard output; a program that imports sae_zoo decides for itself."""
    logger = logging.getLogger("sae_zoo")
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _quiet_lightning() -> None:
    """In-memory tensors need no DataLoader workers; keep Lightning's advice about them off the terminal."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning on newer torch
    # the activation datasets yield whole batches from one process; their length is exact
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_fit(args: argparse.Namespace) -> int:
    from .recipe import fit, load_recipe, resume_recipe
    from .suite import comparison_text, is_suite, run_suite

    if args.resume is not None:
        recipe, overrides = args.recipe, list(args.overrides)
        if recipe is not None and ("=" in recipe or recipe.startswith("~")):  # an override in the recipe's place
            recipe, overrides = None, [recipe, *overrides]
        cfg = resume_recipe(args.resume, recipe, overrides, quick=args.quick)
        return _report_fit(*fit(cfg, recipe_name=Path(args.resume).name, progress=not args.no_progress, resume=True))
    if args.recipe is None:
        raise ValueError("fit needs a recipe file (or --resume RUN_DIR)")
    if is_suite(args.recipe):
        out, rows = run_suite(args.recipe, args.overrides, quick=args.quick, progress=not args.no_progress,
                              evals=tuple(args.evals.split(",")) if args.evals else (),
                              eval_settings=eval_settings(args))
        print(comparison_text(out, rows))
        return 0
    cfg = load_recipe(args.recipe, args.overrides, quick=args.quick)
    if args.evals:  # checked before training: eval names, and the language-model data they read
        from .evals import parse_evals

        parse_evals(args.evals)
        if cfg.model.get("family") == "clt":
            raise ValueError(f"--evals: {args.recipe} trains a cross-layer transcoder, whose run measures it as a "
                             "replacement model (FVU per layer, CE-loss recovered with every MLP replaced); the evals "
                             "read one SAE or transcoder")
        if cfg.data.name != "activations":
            raise ValueError(f"--evals: {args.recipe} trains on data.name {cfg.data.name!r}; the evals read a "
                             "language model's activations (data.name: activations)")
    run_dir, metrics = fit(cfg, recipe_name=Path(args.recipe).stem, progress=not args.no_progress)
    code = _report_fit(run_dir, metrics)
    if args.evals and metrics:
        from .evals import evaluate_source

        out = evaluate_source(run_dir, args.evals, settings=eval_settings(args), progress=not args.no_progress)
        print(f"\n{(out / 'evaluation.md').read_text()}")
    return code


def _report_fit(run_dir: Path, metrics: dict) -> int:
    if not metrics:  # another rank of a multi-device run: rank zero evaluates and reports. Failing here would
        return 0     # end this process non-zero, and Lightning then kills rank zero mid-evaluation (SIGKILL)
    print(f"\nrun directory: {run_dir}")
    print_table([[k, f"{v:.4f}"] for k, v in metrics["test"].items()], ["test metric", "value"])
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    from .frontier import frontier

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    out = frontier(args.recipe, out_dir=args.out, quick=args.quick, progress=not args.no_progress, seeds=seeds)
    print(f"\nwrote {out / 'frontier.csv'}, {out / 'frontier.png'} and {out / 'report.md'}\n")
    print((out / "report.md").read_text())
    return 0


def eval_settings(args: argparse.Namespace, **kwargs: Any) -> Any:
    """The evals' settings from ``--quick``, ``--judge``, ``--absorption-words`` and ``--autointerp-latents``."""
    import dataclasses

    from .evals import EvalSettings
    from .evaluation.absorption import AbsorptionSettings
    from .evaluation.autointerp import AutointerpSettings

    settings = (EvalSettings.quick if args.quick else EvalSettings)(judge=args.judge, **kwargs)
    if args.absorption_words:
        settings.absorption = dataclasses.replace(settings.absorption or AbsorptionSettings(), words=args.absorption_words)
    if args.autointerp_latents:
        settings.autointerp = dataclasses.replace(settings.autointerp or AutointerpSettings(),
                                                  n_latents=args.autointerp_latents)
    return settings


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .dashboard import parse_latents
    from .evals import evaluate_source
    from .sources import SourceData

    data = SourceData(model=args.model, hook=args.hook, hook_out=args.hook_out, gguf_file=args.gguf_file,
                      data=tuple(args.overrides), quick=args.quick)
    settings = eval_settings(args, every_position=args.every_position, latents=parse_latents(args.latents))
    out = evaluate_source(args.source, args.evals, args.out, settings, data, progress=not args.no_progress)
    print(f"\nwrote {out / 'evaluation.json'} and {out / 'evaluation.md'}\n")
    print((out / "evaluation.md").read_text())
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .upgrade import UpgradeOptions, parse_ratios, upgrade

    given = {"model": args.model, "hook": args.hook, "hook_out": args.hook_out, "gguf_file": args.gguf_file,
             "steps": args.steps,
             "solver_steps": args.solver_steps, "hidden": args.hidden, "lr": args.lr, "seed": args.seed}
    options = {k: v for k, v in given.items() if v is not None}
    if args.candidates:
        options["candidates"] = tuple(c.strip() for c in args.candidates.split(","))
    if args.ratios:
        options["ratios"] = parse_ratios(args.ratios)
    if args.evals:
        options["evals"] = tuple(args.evals.split(","))
    upgrade(args.source, args.out, UpgradeOptions(quick=args.quick, data=tuple(args.overrides),
                                                  probing=not args.no_probing, eval_settings=eval_settings(args),
                                                  **options),
            progress=not args.no_progress)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import dashboard, parse_latents

    out = dashboard(args.run_dir, args.out, latents=parse_latents(args.latents), compare=args.compare,
                    n_latents=args.n_latents, contexts=args.contexts, seed=args.seed, layer=args.layer)
    print(f"wrote {out / 'index.html'} (open it in a browser; it needs no server)")
    return 0


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, whole (on one line, without RST's double
    backticks); a full stop after "e.g", "i.e", "et al" or "vs" does not end it."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split()).replace("``", "")
    for end in re.finditer(r"(?<!\.)[.!?](?=\s|$)", paragraph):
        if not re.search(r"\b(e\.g|i\.e|et al|vs|cf)$", paragraph[:end.start()]):
            return paragraph[:end.end()]
    return paragraph


def cmd_list(args: argparse.Namespace) -> int:
    for name in list_encoders(args.filter):
        print(f"{name:<16} {first_sentence(get_encoder_class(name).__doc__)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The paper's amortisation gap: a linear SAE and an MLP head against the known dictionary."""
    from .report import plot_curves
    from .recipe import fit, load_recipe

    demo_dir = Path(args.out) / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    heads = {"SAE (linear)": ("linear", None), f"MLP (hidden={args.hidden})": ("mlp", args.hidden)}
    seeds = [args.seed + i for i in range(args.seeds)]
    results: dict[str, list[tuple[Path, dict]]] = {label: [] for label in heads}
    for label, (name, hidden) in heads.items():
        for seed in seeds:
            print(f"\n== {label}: {args.steps} full-batch steps, model seed {seed} ==", flush=True)
            overrides = [f"encoder.name={name}", *([f"encoder.hidden={hidden}"] if hidden else []), f"seed={seed}",
                         f"trainer.max_steps={args.steps}", f"data.steps_per_epoch={max(1, args.steps // 40)}",
                         f"run_dir={demo_dir / f'{name}-seed{seed}'}"]
            results[label].append(fit(load_recipe(None, overrides), progress=not args.no_progress))

    def summary(mean: float, std: float | None, digits: int) -> str:
        return f"{mean:.{digits}f}" + ("" if std is None else f" +- {std:.{digits}f}")

    def stats(values: list[float]) -> tuple[float, float | None]:
        return float(np.mean(values)), (float(np.std(values)) if len(values) > 1 else None)

    rows, mean_mcc, reference = [], {}, {}
    for label, runs in results.items():
        test = [metrics["test"] for _, metrics in runs]
        mean_mcc[label], mcc_std = stats([t["mcc"] for t in test])
        paper = PAPER_KNOWN_DICTIONARY.get(heads[label])
        if paper:
            reference[label] = paper[0]
        rows.append([label, summary(mean_mcc[label], mcc_std, 3), summary(*paper, 3) if paper else "-",
                     summary(*stats([t["fvu"] for t in test]), 4), summary(*stats([t["l0"] for t in test]), 2)])
    plot = plot_curves({label: [run_dir for run_dir, _ in runs] for label, runs in results.items()},
                       demo_dir / "mcc_vs_step.png", reference=reference,
                       title="Known dictionary: code recovery while training (N=16, M=8, K=3)",
                       ylabel="MCC on the held-out split")
    seeds_text = f"model seed {seeds[0]}" if len(seeds) == 1 else f"model seeds {seeds[0]}-{seeds[-1]}"
    print(f"\nKnown-dictionary synthetic data (N=16 latents, M=8 dims, K=3 active), 1024 test samples, {seeds_text}")
    print_table(rows, ["encoder", "MCC", "MCC (paper, 5 seeds)", "FVU", "L0"])
    sae, mlp = mean_mcc.values()
    print(f"\nAmortisation gap: the MLP head recovers the codes {mlp - sae:+.3f} MCC better than the SAE's linear encoder.")
    print(f"Runs and plot: {demo_dir} ({plot.name})")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .hub import write_card

    path = write_card(args.run_dir, repo_id=args.repo_id)
    print(f"wrote {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_run

    commit = push_run(args.run_dir, args.repo_id, private=args.private or None, branch=args.revision)
    print(f"pushed {args.run_dir} to {args.repo_id}: {commit}")
    print(f"pin this version with SparseCoder.from_pretrained({args.repo_id!r}, revision={commit.oid!r})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hub import export_circuit_tracer, export_saelens, load_run
    from .hub.clt import load_clt_run

    clt = load_clt_run(args.run_dir)
    if clt is not None:  # a cross-layer transcoder: circuit-tracer's CLT folder, every layer at once
        if args.to != "circuit_tracer" or args.layer is not None or args.decoder_only:
            raise ValueError(f"{args.run_dir} holds a cross-layer transcoder: it exports whole to circuit-tracer's CLT "
                             "folder (--to circuit_tracer, no --layer or --decoder-only)")
        out = export_circuit_tracer(clt, args.out, feature_input_hook=args.feature_input_hook,
                                    feature_output_hook=args.feature_output_hook, model_name=args.model_name)
        print(f"wrote circuit-tracer's CLT folder to {out} (W_enc_N/W_dec_N.safetensors for N < {clt.n_layers}, "
              "config.yaml)")
        return 0
    model, _, _ = load_run(args.run_dir)
    if args.to == "circuit_tracer":
        if args.layer is None or args.decoder_only:
            raise ValueError("--to circuit_tracer writes one transcoder per layer: pass --layer N (and no "
                             "--decoder-only)")
        out = export_circuit_tracer(model, args.out, args.layer, feature_input_hook=args.feature_input_hook,
                                    feature_output_hook=args.feature_output_hook, model_name=args.model_name)
        print(f"wrote circuit-tracer's layer_{args.layer}.safetensors to {out} and listed it in its config.yaml")
        return 0
    if args.layer is not None or args.feature_input_hook or args.feature_output_hook:
        raise ValueError("--layer, --feature-input-hook and --feature-output-hook apply to --to circuit_tracer")
    out = export_saelens(model, args.out, hook_name=args.hook_name, model_name=args.model_name,
                         decoder_only=args.decoder_only)
    print(f"wrote a SAELens SAE to {out} (cfg.json, sae_weights.safetensors)")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_eval_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--evals`` and the options of the evals that need them (judge, latents, words)."""
    parser.add_argument("--evals", default=default, help="comma-separated evals: core, probing, absorption, "
                                                         f"autointerp (default {default or 'none'})")
    parser.add_argument("--judge", default=None, help="autointerp's judge: 'default' (SmolLM2-135M-Instruct, "
                                                      "offline), 'hf:MODEL' (any chat LM, in process) or an "
                                                      "OpenAI-compatible endpoint 'URL#MODEL', e.g. "
                                                      "http://127.0.0.1:8000/v1#llama")
    parser.add_argument("--autointerp-latents", type=_positive, default=None,
                        help="autointerp: latents drawn (50; --quick 10)")
    parser.add_argument("--absorption-words", type=_positive, default=None,
                        help=f"absorption: words of the vocabulary drawn (default all, SAEBench's; --quick {QUICK_WORDS})")


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with the line ``sae-zoo --help`` lists it by."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = _subcommand(sub, "fit", help="train and test a recipe (or each run of a suite), writing run directories")
    fit.add_argument("recipe", nargs="?", help="a recipe YAML file, e.g. recipes/synthetic/known_dictionary.yaml")
    fit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.name=mlp seed=1")
    fit.add_argument("--quick", action="store_true", help="the recipe's quick preset (minutes on a CPU), and "
                                                            "smaller --evals runs")
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_eval_options(fit, default=None)  # a suite's: named evals of each run, compared in evaluations.md
    fit.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="go on with a killed run from its last checkpoint (a recipe with checkpoint_every: N); a "
                          "recipe given too must be the run's own")
    fit.set_defaults(func=cmd_fit)

    front = _subcommand(sub, "frontier", help="test MCC against total FLOPs for many methods (CSV, PNG, report)")
    front.add_argument("recipe", help="a frontier recipe, e.g. recipes/synthetic/frontier.yaml")
    front.add_argument("--quick", action="store_true", help="the recipe's quick preset (minutes)")
    front.add_argument("--out", default=None, help="output folder (default runs/frontier[-quick])")
    front.add_argument("--seeds", default=None, help="model seeds replacing the recipe's, e.g. 20240625,20240626")
    front.add_argument("--no-progress", action="store_true", help="print no per-point progress")
    front.set_defaults(func=cmd_frontier)

    up = _subcommand(sub, "upgrade", help="try other encoders on an SAE's frozen decoder, compared at its own L0")
    up.add_argument("source", help="a sae-zoo fit run, an SAE folder or Hub repo, or a catalogue name "
                                   "(sae_zoo.list_pretrained()), e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre")
    up.add_argument("overrides", nargs="*", help="data.KEY=VALUE overrides of the activation data, e.g. "
                                                 "data.n_train_tokens=200000")
    up.add_argument("--model", default=None, help="the language model, when the SAE's metadata names none")
    up.add_argument("--hook", default=None, help="the hook the SAE reads, when its metadata names none")
    up.add_argument("--hook-out", default=None, help="the hook a transcoder writes (its target), when its metadata "
                                                     "names none")
    up.add_argument("--gguf-file", default=None, help="the GGUF file of --model, for a GGUF checkpoint")
    up.add_argument("--candidates", default=None, help="comma-separated registered candidates (built in: retrained, "
                                                       "residual_mlp, fista, mp, ito; default: all, and for a "
                                                       "transcoder the amortised ones)")
    up.add_argument("--ratios", default=None, help="the sweep, as multiples of the SAE's L0 (default 0.5,0.7,1,1.4,2;"
                                                   " --quick 0.7,1,1.4)")
    up.add_argument("--steps", type=_positive, default=None, help="training steps (default: the run's, or 10000)")
    up.add_argument("--solver-steps", type=_positive, default=None, help="FISTA and ITO iterations (200; --quick 50)")
    up.add_argument("--hidden", type=_positive, default=None, help="the residual MLP's hidden width (1024)")
    up.add_argument("--lr", type=float, default=None, help="learning rate of the trained candidates (1e-3)")
    up.add_argument("--seed", type=int, default=None, help="seed of the candidates' initialisation (0)")
    up.add_argument("--out", default=None, help="output folder (default runs/upgrade/NAME[-quick])")
    up.add_argument("--quick", action="store_true", help="a smaller sweep, smaller --evals runs and, for a "
                                                                "checkpoint, less data (minutes)")
    up.add_argument("--no-probing", action="store_true", help="skip k-sparse probing of every point")
    _add_eval_options(up, default=None)
    up.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    up.set_defaults(func=cmd_upgrade)

    ev = _subcommand(sub, "evaluate", help="measure an SAE on language-model data the field's way (SAEBench's core, "
                                           "probing, absorption; auto-interpretability), writing evaluation.json and "
                                           "evaluation.md")
    ev.add_argument("source", help="a sae-zoo fit run (measured on its own data), an SAE folder or Hub repo, or a "
                                   "catalogue name (release/id)")
    ev.add_argument("overrides", nargs="*", help="data.KEY=VALUE overrides of the activation data")
    _add_eval_options(ev, default="core")
    ev.add_argument("--latents", default=None, help="autointerp: comma-separated latent indices (default: drawn)")
    ev.add_argument("--out", default=None, help="output folder (default: the run's own; needed for other sources)")
    ev.add_argument("--every-position", action="store_true", help="splice BOS and the outlier tokens too when "
                                                                  "measuring CE and KL, as SAEBench's core does")
    ev.add_argument("--model", default=None, help="the language model, when the SAE's metadata names none")
    ev.add_argument("--hook", default=None, help="the hook the SAE reads, when its metadata names none")
    ev.add_argument("--hook-out", default=None, help="the hook a transcoder writes, when its metadata names none")
    ev.add_argument("--gguf-file", default=None, help="the GGUF file of --model, for a GGUF checkpoint")
    ev.add_argument("--quick", action="store_true", help="smaller absorption and autointerp runs, and less data "
                                                                "for a source that is not a run (minutes)")
    ev.add_argument("--no-progress", action="store_true", help="print no per-eval progress")
    ev.set_defaults(func=cmd_evaluate)

    dash = _subcommand(sub, "dashboard", help="write static HTML pages showing what a run's latents fire on")
    dash.add_argument("run_dir", help="a run directory of sae-zoo fit, on language-model activations")
    dash.add_argument("--latents", default=None, help="comma-separated latent indices (default: --n-latents drawn "
                                                      "at random from those that fire)")
    dash.add_argument("--n-latents", type=_positive, default=16, help="how many latents to draw (16)")
    dash.add_argument("--compare", default=None, help="another run with the same decoder, e.g. a head trained on "
                                                      "the run's frozen dictionary: its codes side by side")
    dash.add_argument("--contexts", type=_positive, default=512, help="windows of the run's text to read (512, two "
                                                                      "per document)")
    dash.add_argument("--seed", type=int, default=0, help="seed of the latent draw and the band examples (0)")
    dash.add_argument("--layer", type=int, default=None, help="a cross-layer transcoder's run: the block whose "
                                                              "latents to show (default: its span's first)")
    dash.add_argument("--out", default=None, help="output folder (default RUN_DIR/dashboard[-vs-OTHER])")
    dash.set_defaults(func=cmd_dashboard)

    lst = _subcommand(sub, "list",
                      help="list the registered encoder heads, each with the first sentence of its docstring")
    lst.add_argument("filter", nargs="?", default="*", help="shell-style pattern, e.g. 'top*'")
    lst.set_defaults(func=cmd_list)

    demo = _subcommand(sub, "demo", help="SAE vs MLP on the paper's known-dictionary data")
    demo.add_argument("--steps", type=_positive, default=20_000, help="full-batch training steps (paper: 20000)")
    demo.add_argument("--seed", type=int, default=20240625, help="model seed")
    demo.add_argument("--seeds", type=_positive, default=1, help="model seeds from --seed on (the paper: 5)")
    demo.add_argument("--hidden", type=_positive, default=256, help="MLP hidden width")
    demo.add_argument("--out", default="runs", help="folder for the demo's runs and plot")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=cmd_demo)

    card = _subcommand(sub, "card", help="write RUN_DIR/README.md, the run's model card")
    card.add_argument("run_dir", help="a run directory written by sae-zoo fit")
    card.add_argument("--repo-id", default=None, help="the Hub repo the card's usage snippet names")
    card.set_defaults(func=cmd_card)

    push = _subcommand(sub, "push", help="push a run's model and card to the Hugging Face Hub")
    push.add_argument("run_dir", help="a run directory written by sae-zoo fit, or a saved model's folder (e.g. an "
                                      "upgrade's cards/NAME)")
    push.add_argument("repo_id", help="the Hub repo, e.g. user/sae-mlp-known-dictionary (created if needed)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="the branch to push to (created from main if needed)")
    push.set_defaults(func=cmd_push)

    export = _subcommand(sub, "export", help="write a run's SAE in SAELens's format (linear, top-k, BatchTopK, "
                                           "JumpReLU, gated and matching-pursuit heads; --decoder-only for others), "
                                           "or a transcoder in circuit-tracer's per-layer format (a cross-layer "
                                           "transcoder: its CLT folder)")
    export.add_argument("run_dir", help="a run directory written by sae-zoo fit")
    export.add_argument("out", help="the folder to write to (SAELens: cfg.json and sae_weights.safetensors; "
                                    "circuit-tracer: layer_N.safetensors, added to its config.yaml)")
    export.add_argument("--to", choices=("saelens", "circuit_tracer"), default="saelens", help="the format (saelens)")
    export.add_argument("--layer", type=int, default=None, help="circuit_tracer: the layer whose MLP it replaces")
    export.add_argument("--feature-input-hook", default=None,
                        help="circuit_tracer: the per-layer hook it reads (e.g. ln2.hook_normalized)")
    export.add_argument("--feature-output-hook", default=None,
                        help="circuit_tracer: the per-layer hook it writes (e.g. hook_mlp_out)")
    export.add_argument("--hook-name", default=None, help="the hook the SAE reads, recorded in cfg.json")
    export.add_argument("--model-name", default=None, help="the model the SAE reads, recorded in cfg.json")
    export.add_argument("--decoder-only", action="store_true",
                        help="export any head's dictionary with a tied encoder (W_enc = W_dec^T)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options: sae-zoo fit RECIPE --quick seed=1
        if args.command not in ("fit", "upgrade", "evaluate") or not all("=" in e or e.startswith("~") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    _quiet_lightning()
    _show_progress()
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:  # a user's mistake: no traceback
        # (RecipeError is a ValueError; FileNotFoundError, ConnectionError and IsADirectoryError are OSErrors)
        print(f"sae-zoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
