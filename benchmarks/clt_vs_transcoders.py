"""The SmolLM2 table: a cross-layer transcoder over four consecutive blocks (plain and with a skip term) against
per-layer transcoders (plain and with a skip term) on the same blocks, at equal total latents (the same latents per layer), equal summed L0 (top-k with
the same k per layer) and equal tokens (the same data, batch and steps), from one recipe.

    python benchmarks/clt_vs_transcoders.py --quick            # 2 CPU cores: about half an hour
    python benchmarks/clt_vs_transcoders.py                    # the full recipe, for a GPU

Trains the recipe's CLT (and with ``model.skip_connection``), then the per-layer sets from one LM pass each
(``data.hooks``, one transcoder per block), and judges all four on the same held-out tokens and contexts: FVU of every block's MLP output, and CE-loss
recovered with all four MLPs replaced at once (against zeroing them all, and against each one's mean output), each
with its standard error by bootstrap over contexts. Writes ``table.md`` and ``results.json`` in the output folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from sae_zoo._io import atomic_write_json, atomic_write_text
from sae_zoo.clt_recipe import clt_data, clt_hooks, evaluate_clt
from sae_zoo.hub import load_sae
from sae_zoo.recipe import fit, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llm" / "smollm2_clt.yaml"
#: the table's rows: each model's run folder name and label
LABELS = {"clt": "cross-layer transcoder", "skip_clt": "cross-layer transcoder + skip",
          "transcoders": "per-layer transcoders", "skip_transcoders": "per-layer skip-transcoders"}


def transcoder_recipe(clt_cfg, skip: bool):
    """The CLT recipe as per-layer transcoders: its layers' [input, output] pairs, its head, latents per layer,
    learning rate and schedule, AuxK and steps."""
    _, hooks = clt_hooks(clt_cfg)
    cfg = clt_cfg.copy()
    cfg.data.hooks = [list(pair) for pair in hooks]
    model = OmegaConf.to_container(clt_cfg.model)
    cfg.probing = {"enabled": False}  # the table reads the replacement's figures, not each hook's probes
    cfg.model = {"family": "transcoder", "skip_connection": skip, "lr": model.get("lr", 1e-3),
                 "lr_decay_steps": model.get("lr_decay_steps", 0), "auxk_coeff": model.get("auxk_coeff", 0.0),
                 "dead_tokens": model.get("dead_tokens", 10_000_000)}
    return cfg


def per_layer_models(run_dir: Path, hooks: list[tuple[str, str]]) -> list:
    return [load_sae(run_dir / f"{i}_to_{o}").model() for i, o in hooks]


def cell(figures: dict, key: str, digits: int = 3) -> str:
    return f"{figures[key]:.{digits}f} ± {figures[key + '_se']:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out or f"runs/clt_vs_transcoders{'-quick' if args.quick else ''}")
    cfg = load_recipe(args.recipe, args.overrides, quick=args.quick)
    layers, hooks = clt_hooks(cfg)
    runs = {name: out / name for name in LABELS}
    for name, run_dir in runs.items():
        if (run_dir / "metrics.json").exists():
            continue
        if name.endswith("clt"):
            one = cfg.copy()
            one.model.skip_connection = name == "skip_clt"
        else:
            one = transcoder_recipe(cfg, skip=name == "skip_transcoders")
        one.run_dir = str(run_dir)
        fit(one, recipe_name=name, progress=False)
    models = {name: load_sae(run_dir / "model").model() if name.endswith("clt") else per_layer_models(run_dir, hooks)
              for name, run_dir in runs.items()}
    data, _ = clt_data(cfg)
    data.prepare_data()
    results = evaluate_clt(models, data)
    atomic_write_json(out / "results.json", results)
    n = len(hooks)
    head = (f"| model | summed L0 | {' | '.join(f'FVU block {layer}' for layer in layers)} | mean FVU | "
            "CE recovered, all MLPs replaced (vs zero) | vs mean ablation | KL score |")
    lines = [f"SmolLM2-135M-Instruct, blocks {layers[0]}-{layers[-1]}: {cfg.dictionary.n_latents} latents per layer, "
             f"{cfg.encoder.name} k={cfg.encoder.get('k')} per layer, {cfg.trainer.max_steps} steps of "
             f"{cfg.data.batch_size} tokens; {results['clt']['tokens']} held-out tokens, "
             f"{results['clt']['ce_contexts']} CE contexts (standard errors by bootstrap over contexts)", "",
             head, "|" + "---|" * (n + 6)]
    for name, figures in results.items():
        fvus = " | ".join(cell(figures, f"fvu_layer_{layer}") for layer in layers)
        lines.append(f"| {LABELS[name]} | {figures['l0_summed']:.1f} | {fvus} | {cell(figures, 'fvu_mean')} | "
                     f"{cell(figures, 'ce_loss_recovered')} | {cell(figures, 'ce_loss_recovered_vs_mean')} | "
                     f"{cell(figures, 'kl_div_score')} |")
    clean = results["clt"]
    lines += ["", f"CE clean {clean['ce_clean']:.4f}; all {n} MLPs zeroed {clean['ce_zero_ablation']:.4f}; "
              f"each replaced by its mean {clean['ce_mean_ablation']:.4f}."]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
