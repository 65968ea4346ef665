"""Feature absorption on SmolLM2, by sae_zoo and by SAEBench's own code, on the same SAE, words and seed.

SAEBench loads language models through TransformerLens, which does not list SmolLM2: the model is converted with
``sae_zoo.hooked.hooked_llama`` (TransformerLens's own ``convert_llama_weights``), and the SAE is exported to
SAELens's format (identical codes). SAEBench's vocabulary is given the same words in the same order (its own order
is a hash map's, another in each process). Prints both implementations' figures, per letter and mean, and their
differences; the issue's bar is 0.02 on ``mean_absorption_fraction_score`` and ``mean_full_absorption_score``.

    python benchmarks/absorption_parity.py RUN_DIR [--words 3000]      # an SAE run on SmolLM2's activations
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def saebench(hooked, sae, layer: int, words: list[str], s, folder: Path) -> dict[str, dict[str, float]]:
    """SAEBench's k-sparse probing and feature absorption experiments, per letter."""
    from sae_bench.evals.absorption import common, feature_absorption, k_sparse_probing
    from sae_bench.evals.absorption.main import _aggregate_results_df

    for module in (common, feature_absorption):
        module.get_alpha_tokens = lambda _: list(words)
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    args = dict(model=hooked, sae=sae, layer=layer, sae_name="sae", max_k_value=s.max_k,
                prompt_template=s.prompt_template, prompt_token_pos=-6, device="cpu", probes_dir=folder / "probes",
                force=True)
    metrics = k_sparse_probing.run_k_sparse_probing_experiment(
        **args, experiment_dir=folder / "k_sparse", f1_jump_threshold=s.f1_jump, verbose=False).set_index("letter")
    raw = feature_absorption.run_feature_absortion_experiment(
        **args, experiment_dir=folder / "absorption", sparse_probing_experiment_dir=folder / "k_sparse",
        feature_split_f1_jump_threshold=s.f1_jump, batch_size=10)
    aggregated = _aggregate_results_df(raw).set_index("letter")
    return {letter: {"probe_f1": float(metrics.loc[letter, "f1_probe"]),
                     "fraction": float(aggregated.loc[letter, "mean_absorption_fraction"]),
                     "full": float(aggregated.loc[letter, "full_absorption_rate"]),
                     "words": int(aggregated.loc[letter, "num_probe_true_positives"])}
            for letter in aggregated.index}


def means(letters: dict[str, dict[str, float]], threshold: float) -> dict[str, float]:
    counted = [r for r in letters.values() if r["probe_f1"] > threshold and r["words"] > 0]
    return {"letters": len(counted),
            "mean_absorption_fraction_score": statistics.mean(r["fraction"] for r in counted) if counted else None,
            "mean_full_absorption_score": statistics.mean(r["full"] for r in counted) if counted else None}


def main() -> None:
    from sae_lens import SAE

    from sae_zoo.evaluation.absorption import (AbsorptionSettings, absorption, alpha_words, draw_words, letter_task,
                                               prompt_activations, word_position)
    from sae_zoo.hooked import hooked_llama
    from sae_zoo.hub import export_saelens, load_run
    from sae_zoo.recipe import build

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a sae-zoo fit run of an SAE on a Llama's (SmolLM2's) residual stream")
    parser.add_argument("--words", type=int, default=3000, help="words of the vocabulary (3000; 0: all)")
    args = parser.parse_args()

    model, cfg, _ = load_run(args.run_dir)
    model.eval()
    datamodule, _ = build(OmegaConf.create(cfg))
    lm, tokenizer, hook = datamodule.language_model()
    layer = int(hook.path.rsplit(".", 1)[1])
    if hook.side != "output" or not hook.path.endswith(f"layers.{layer}"):
        raise SystemExit(f"{args.run_dir}: SAEBench reads blocks.L.hook_resid_post; this SAE reads {hook.name}")
    s = AbsorptionSettings(words=args.words or None)
    words = draw_words(alpha_words(tokenizer), s.words, s.seed)
    print(f"{len(words)} words; SmolLM2 at {hook.name} (blocks.{layer}.hook_resid_post); seed {s.seed}", flush=True)

    start = time.perf_counter()
    position = word_position(tokenizer, s.prompt_template)
    task = letter_task(tokenizer, lambda p: prompt_activations(lm, tokenizer, hook, p, position,
                                                               datamodule.prepend_bos), s, words=words)
    scale = datamodule.scale
    result = absorption(task, lambda x: model.encode(x * scale).float(), model.dictionary.atoms.detach(), s)
    ours_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        exported = SAE.load_from_disk(str(export_saelens(model, folder / "saelens",
                                                         hook_name=f"blocks.{layer}.hook_resid_post")))
        start = time.perf_counter()
        theirs = saebench(hooked_llama(lm, tokenizer, model_name="smollm2"), exported, layer, words, s, folder)
        theirs_seconds = time.perf_counter() - start

    print("\nper letter (probe F1, words, absorption fraction, full absorption): sae_zoo | SAEBench")
    for letter, mine in result.letters.items():
        other = theirs.get(letter, {"probe_f1": float("nan"), "words": 0, "fraction": 0.0, "full": 0.0})
        print(f"  {letter}: {mine['probe_f1']:.3f} {mine['words']:4d} {mine['fraction']:.3f} {mine['full']:.3f} | "
              f"{other['probe_f1']:.3f} {other['words']:4d} {other['fraction']:.3f} {other['full']:.3f}")
    ours_means = means(result.letters, s.min_probe_f1)
    their_means = means(theirs, s.min_probe_f1)
    figures = result.figures()
    print(f"\nletters with probe F1 > {s.min_probe_f1}: sae_zoo {ours_means['letters']}, SAEBench "
          f"{their_means['letters']} (SAEBench's gate needs {s.min_letters}: "
          f"{'passed' if figures['absorption_gate_passed'] else 'FAILED'})")
    for key in ("mean_absorption_fraction_score", "mean_full_absorption_score"):
        a, b = ours_means[key], their_means[key]
        gap = abs(a - b) if a is not None and b is not None else float("nan")
        print(f"{key}: sae_zoo {a}, SAEBench {b}, |difference| {gap:.2e} (bar 0.02)")
    print(f"time: sae_zoo {ours_seconds:.0f} s, SAEBench {theirs_seconds:.0f} s")


if __name__ == "__main__":
    main()
