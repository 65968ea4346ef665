"""Every GPU figure the README reports, in one run of about 10 minutes on one H100/H200-class GPU, into one folder.

1. ``throughput.txt``: the bf16 training and inference throughput of the linear, top-k, BatchTopK and MLP heads
   against their dense bound (``benchmarks/throughput.py``; d_model 768, 24,576 latents, batch 4,096).
   ``clt_layers.log``: a cross-layer transcoder's training step time and peak GPU memory against the layers it
   spans (1, 2, 4, 8; d_model 768, 16,384 latents per layer, top-k 32, batch 4,096), beside per-layer transcoders
   (``benchmarks/clt_layers.py``; under a minute).
2. ``bench16k.json`` / ``bench16k.md``: SynthSAEBench-16k's structure (16,384 features in 768 dimensions, drawn
   by SAELens's generator on the GPU, built from its configuration since the machine may reach no Hub): the
   BatchTopK SAE of ``recipes/synthsaebench/bench16k.yaml`` and sae_zoo's best (Matryoshka BatchTopK with its
   defaults), each trained on as many fresh samples as fit its share of the time, with the sample count. A short
   run first measures each one's steps per second.
3. ``smollm2/``: the quick preset of ``recipes/llm/smollm2_sae_vs_heads.yaml`` on the GPU (its report).
4. ``transcoders/``: the quick preset of ``recipes/llm/smollm2_transcoders.yaml`` on the GPU: an SAE, a transcoder
   and a skip-transcoder of block 8's MLP (paired activations, and CE-loss recovered with the MLP replaced, on the
   GPU). Its full preset (3 x 20,000 steps of 4,096 tokens) does not fit a device session of minutes.
5. ``pipeline.json`` / ``pipeline.log``: ``benchmarks/lm_pipeline.py`` at GPU size: SmolLM2 in bf16, trained on the
   fly (524,288 tokens of 4,096-token batches, LM batches of 256 contexts, the next refill read in a thread while the
   SAE trains) against the bare LM, the cache path, three hooks (blocks 5, 10, 15) from one pass against one, and
   peak memory at 524,288 and 2,097,152 tokens (about 2 minutes; bench16k's rows train 70 s each to leave it room).

``--dry-run`` runs the same steps on the CPU at tiny sizes in seconds (``--lm-model`` then names a small
language model folder, of at least 9 blocks, for steps 3 and 4, as the test gives); a test runs it, so the
script cannot rot.

    python benchmarks/gpu.py --out runs/gpu            # on the GPU (benchmarks/gpu.sh installs carried wheels first)
    python benchmarks/gpu.py --dry-run --out /tmp/gpu  # the same steps on the CPU, tiny
    python benchmarks/gpu.py --steps pipeline,bench16k # some of the steps, in that order
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: every step, in the order a full run takes them (``--steps`` picks some)
STEPS = ("throughput", "clt_layers", "bench16k", "smollm2", "transcoders", "pipeline")
SAE_ZOO = [sys.executable, "-m", "sae_zoo.cli"]

#: the SynthSAEBench-16k model's structure (recipes/synthsaebench/cpu2k.yaml's, at full size)
SYNTH_16K = {"num_features": 16384, "hidden_dim": 768,
             "firing_probability": {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.4, "min_prob": 0.0005},
             "hierarchy": {"total_root_nodes": 128, "branching_factor": 4, "max_depth": 3,
                           "mutually_exclusive_portion": 1.0, "scale_children_by_parent": True,
                           "compensate_probabilities": True},
             "correlation": {"rank": 25, "correlation_scale": 0.1},
             "orthogonalization": {"num_steps": 100, "lr": 0.01},
             "mean_firing_magnitudes": {"generator_name": "linear", "start": 5.0, "end": 4.0},
             "std_firing_magnitudes": {"generator_name": "folded_normal", "mean": 0.5, "std": 0.5},
             "seed": 42}
TINY_SYNTH = {**SYNTH_16K, "num_features": 256, "hidden_dim": 32,
              "hierarchy": {**SYNTH_16K["hierarchy"], "total_root_nodes": 4}}

#: bench16k.yaml's BatchTopK row, and sae_zoo's best written plainly (its defaults; groups n/32, n/8, n/2, n)
ROWS = {"batchtopk": ("BatchTopK (k={k}) + AuxK", {"encoder": {"name": "batchtopk", "k": 25, "subtract_decoder_bias": True},
                                                 "model": {"auxk_coeff": 0.03125, "tied_init": True, "lr": 0.0003}}),
        "ours": ("sae_zoo Matryoshka BatchTopK (k={k}), defaults", {
            "encoder": {"name": "batchtopk", "k": 25},
            "model": {"matryoshka_widths": [128, 512, 2048, 4096]}})}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], out: Path, name: str, timeout: float, cwd: Path = ROOT) -> int:
    """``command``, run in ``cwd``, with its output in ``out/name.log``; its exit status (124 when it outran
    ``timeout`` s)."""
    log(f"{name}: {' '.join(command)}")
    with open(out / f"{name}.log", "w") as f:
        try:
            return subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def environment(out: Path, device: str) -> None:
    import torch
    info = {"torch": torch.__version__, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "python": sys.version.split()[0]}
    (out / "environment.json").write_text(json.dumps(info, indent=1))
    log(f"environment: {info}")


def throughput(out: Path, dry: bool) -> int:
    args = (["--device", "cpu", "--dtype", "fp32", "--d-models", "32", "--batch", "64", "--k", "4", "--repeats", "1"]
            if dry else ["--device", "cuda", "--dtype", "bf16", "--d-models", "768", "--batch", "4096", "--repeats", "5"])
    return run([sys.executable, "benchmarks/throughput.py", *args, "--heads", "linear,top-k,BatchTopK,MLP",
                "--fista-steps", "2" if dry else "50", "--no-field"], out, "throughput", 60 if dry else 150)


def clt_layers(out: Path, dry: bool) -> int:
    """A CLT's training step time and peak memory against the layers it spans, beside per-layer transcoders."""
    args = (["--device", "cpu", "--in-process", "--layers", "1,2", "--d-model", "16", "--d-transcoder", "32", "--k",
             "4", "--batch", "64", "--steps", "1", "--warmup", "0"] if dry else
            ["--device", "cuda", "--layers", "1,2,4,8", "--d-model", "768", "--d-transcoder", "16384", "--k", "32",
             "--batch", "4096", "--steps", "20"])
    return run([sys.executable, "benchmarks/clt_layers.py", *args], out, "clt_layers", 60 if dry else 120)


def synth_recipe(row: str, steps: int, dry: bool, run_dir: Path) -> dict:
    """One run of bench16k's setting (tiny in a dry run) on ``steps`` batches of fresh samples."""
    label, recipe = ROWS[row]
    n_latents, k, batch = (64, 4, 256) if dry else (4096, 25, 1024)
    encoder = {**recipe["encoder"], "k": k}
    model = {"l1_coeff": 0.0, "code_recovery": False, **recipe["model"]}
    if "matryoshka_widths" in model:
        model["matryoshka_widths"] = [n_latents // 32, n_latents // 8, n_latents // 2, n_latents]
    return {"setting": "unknown", "seed": 1, "run_dir": str(run_dir),
            "data": {"name": "synthsaebench", "config": TINY_SYNTH if dry else SYNTH_16K, "stream": True,
                     "device": "cpu" if dry else "cuda", "n_train": steps * batch, "n_test": 2048 if dry else 100000,
                     "batch_size": batch, "seed": 0},
            "dictionary": {"n_latents": n_latents, "bias": True}, "encoder": encoder, "model": model,
            "trainer": {"max_steps": steps, "precision": "32-true" if dry else "bf16-mixed",
                        "accelerator": "cpu" if dry else "gpu", "log_every_n_steps": 50,
                        "val_check_interval": steps, "check_val_every_n_epoch": None, "enable_progress_bar": False},
            "matmul_precision": "highest" if dry else "high"}


def fit(recipe: dict, out: Path, name: str, timeout: float) -> dict | None:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if run([*SAE_ZOO, "fit", str(path), "--no-progress"], out, name, timeout) != 0:
        return None
    return json.loads((Path(recipe["run_dir"]) / "metrics.json").read_text())


def bench16k(out: Path, dry: bool, seconds_each: float) -> int:
    """Each row: a short run measures its steps per second, then it trains on as many batches as fit (a dry run
    measures the first row only, and trains each on the short run's steps)."""
    results, calibration = {}, 10 if dry else 200
    for i, (row, (label, _)) in enumerate(ROWS.items()):
        steps = calibration
        if not (dry and i):
            short = fit(synth_recipe(row, calibration, dry, out / "runs" / f"{row}_calibration"), out,
                        f"bench16k_{row}_calibration", 120 if dry else 240)
            if short is None:
                log(f"bench16k {row}: the calibration run failed (see its log)")
                return 1
            if not dry:
                steps = max(calibration, int(seconds_each * short["steps"] / short["train_seconds"]))
        metrics = fit(synth_recipe(row, steps, dry, out / "runs" / row), out, f"bench16k_{row}",
                      120 if dry else seconds_each * 2 + 120)
        if metrics is None:
            log(f"bench16k {row}: the run failed (see its log)")
            return 1
        batch = 256 if dry else 1024
        test = metrics["test"]
        results[row] = {"label": label.format(k=4 if dry else 25), "samples": steps * batch, "steps": steps, "train_seconds": metrics["train_seconds"],
                        "f1": test["latent_f1"], "mcc": test["dictionary_mcc"], "ve": 1 - test["fvu"], "l0": test["l0"]}
        log(f"bench16k {row}: {results[row]}")
    (out / "bench16k.json").write_text(json.dumps(results, indent=1))
    lines = ["| method | samples | train s | F1 | MCC | VE | L0 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['samples']:,} | {r['train_seconds']:.0f} | {r['f1']:.3f} | {r['mcc']:.3f} | "
              f"{r['ve']:.3f} | {r['l0']:.2f} |" for r in results.values()]
    (out / "bench16k.md").write_text("\n".join(lines) + "\n")
    return 0


def llm_suite(out: Path, dry: bool, lm_model: str | None, recipe: str, name: str, hook: list[str]) -> int:
    """An LM suite's quick preset on the GPU; a dry run reads a small LM's activations for a few steps (``hook``:
    the overrides that point its runs at that LM's hooks), with its activation caches under ``out`` (it runs
    there: a suite's runs may read several hooks, each cached in its own folder of ``runs/activation_cache``)."""
    if dry:
        overrides = [f"data.model={lm_model}", *hook, "~data.gguf_file", "data.n_train_tokens=2048",
                     "data.n_test_tokens=512", "data.batch_size=128", "data.shard_tokens=1024",
                     "data.shuffle_buffer=2048", "data.ce_contexts=4", "data.context_len=16", "trainer.max_steps=4",
                     "trainer.accelerator=cpu", "probing.enabled=false"]
    else:
        overrides = ["trainer.accelerator=gpu"]
    suite = ("import sys; from sae_zoo.suite import run_suite; "
             "run_suite(sys.argv[1], sys.argv[3:], quick=True, out_dir=sys.argv[2], progress=False)")
    return run([sys.executable, "-c", suite, str(ROOT / recipe), str(out / name), *overrides], out, name,
               300 if dry else 240, cwd=out if dry else ROOT)


def pipeline(out: Path, dry: bool, lm_model: str | None) -> int:
    """Training on the fly at GPU size (``benchmarks/lm_pipeline.py``); a dry run reads a small LM on the CPU."""
    if dry:
        options = ["--model", lm_model, "--gguf-file", "", "--layers", "2,5,8", "--tokens", "2048",
                   "--long-tokens", "4096", "--buffer-contexts", "40", "--model-batch-size", "8", "--batch-size", "256",
                   "--context-len", "16", "--one-process"]
    else:
        options = ["--device", "cuda", "--model-dtype", "bfloat16", "--prefetch", "--tokens", "524288",
                   "--long-tokens", "2097152", "--model-batch-size", "256", "--buffer-contexts", "1024"]
    return run([sys.executable, str(ROOT / "benchmarks" / "lm_pipeline.py"), "--skip-saelens",
                "--out", str(out / "pipeline.json"), *options], out, "pipeline", 300 if dry else 150)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=f"runs/gpu-{time.strftime('%Y%m%d-%H%M%S')}", help="the results folder")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--lm-model", default=None, help="dry run: a small language model folder for step 3")
    parser.add_argument("--bench16k-seconds", type=float, default=70, help="training seconds of each bench16k row")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"the steps to run, comma-separated, in this order (of {', '.join(STEPS)})")
    args = parser.parse_args()
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: no step named {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    if not dry:
        import torch
        if not torch.cuda.is_available():
            parser.error("no GPU is visible to torch; --dry-run runs the same steps on the CPU")
    start = time.perf_counter()
    environment(out, "cpu" if dry else "cuda")
    needs_lm = {"smollm2", "transcoders", "pipeline"}
    status = {}
    for step in steps:
        if step in needs_lm and dry and args.lm_model is None:
            log(f"{step}: skipped (a dry run needs --lm-model)")
            continue
        if step == "throughput":
            status[step] = throughput(out, dry)
        elif step == "clt_layers":
            status[step] = clt_layers(out, dry)
        elif step == "bench16k":
            status[step] = bench16k(out, dry, args.bench16k_seconds)
        elif step == "smollm2":
            status[step] = llm_suite(out, dry, args.lm_model, "recipes/llm/smollm2_sae_vs_heads.yaml", "smollm2",
                                     ["data.hook=resid_post.1"])
        elif step == "transcoders":
            # the transcoder suite's runs name block 8's MLP each: the dry run's LM has that block
            status[step] = llm_suite(out, dry, args.lm_model, "recipes/llm/smollm2_transcoders.yaml", "transcoders",
                                     [])
        else:
            status[step] = pipeline(out, dry, args.lm_model)
    status["seconds"] = round(time.perf_counter() - start, 1)
    (out / "status.json").write_text(json.dumps(status, indent=1))
    log(f"done in {status['seconds']} s: {status}; results in {out}")
    return 0 if all(v == 0 for k, v in status.items() if k != "seconds") else 1


if __name__ == "__main__":
    sys.exit(main())
