"""Is SAELens's SynthSAEBench sampler the bottleneck of training on a CPU? Samples/s of the sampler
(``SyntheticModel.sample_with_features``, in blocks of several sizes) against samples/s of a BatchTopK
SAE's training step (``SparseCoder.training_step`` + Adam) at the CPU suite's shapes, side by side in
one run.

    python benchmarks/synthsaebench_sampler.py              # recipes/synthsaebench/cpu2k.yaml's shapes
    python benchmarks/synthsaebench_sampler.py --quick      # fewer seconds per figure

Prints both rates and their ratio: above 1, drawing a batch costs more than training on it, and the
suite caches the samples once (``data.stream: false``) instead of drawing them every step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from sae_lens.synthetic import SyntheticModel

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data.synthsaebench import model_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthsaebench" / "cpu2k.yaml"


def rate(work, batch: int, seconds: float) -> float:
    """Samples per second of ``work(batch)`` over about ``seconds``, after one warm-up call."""
    work(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work(batch)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 8.0
    recipe = yaml.safe_load(RECIPE.read_text())
    config, n_latents = recipe["base"]["data"]["config"], recipe["base"]["dictionary"]["n_latents"]
    generator = SyntheticModel(model_config(config))
    batch = recipe["base"]["data"]["batch_size"]
    print(f"SynthSAEBench model: {config['num_features']} features in {config['hidden_dim']} dimensions; "
          f"SAE of {n_latents} latents, batch {batch}, {torch.get_num_threads()} threads")
    sampler = {block: rate(lambda n: generator.sample_with_features(n), block, seconds) for block in (1024, 4096, 16384)}
    for block, value in sampler.items():
        print(f"  SAELens sampler, blocks of {block:>6,}: {value:>10,.0f} samples/s")
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("batchtopk", d_model=config["hidden_dim"], n_latents=n_latents, k=8),
                        Dictionary(n_latents, config["hidden_dim"], trainable=True, bias=True), l1_coeff=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = generator.sample(batch)

    def step(n: int) -> None:
        optimizer.zero_grad()
        model.training_losses(x[:n], measure_l0=False)["loss"].backward()
        optimizer.step()
        model.dictionary.normalize_()

    training = rate(step, batch, seconds)
    best = max(sampler.values())
    print(f"  BatchTopK training step:            {training:>10,.0f} samples/s")
    print(f"training / fastest sampling: {training / best:.2f} (above 1: the sampler is the bottleneck)")


if __name__ == "__main__":
    main()
