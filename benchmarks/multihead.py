"""Several heads from one pass over the activations (HeadBank) against training them one by one.

The heads are those of an upgrade: residual MLPs starting at one SAE's encoder, each at its own target
L0, on the SAE's frozen decoder. Both ways train every head for the same steps on the same batches of
an activation cache (safetensors shards, read as training reads them). Printed: the seconds of each
way, the seconds spent reading the data alone (one pass), and the speed-up. One by one pays the data
once per head; the bank pays it once. With the language model in the loop instead of a cache, the
data cost is its forward pass, and the saving grows with it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data.activations import ShardedActivations, save_shard
from sae_zoo.encoders.mlp import ResidualMLPEncoder
from sae_zoo.multihead import HeadBank


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0)


def heads(n: int, sae: SparseCoder, hidden: int) -> dict[str, SparseCoder]:
    torch.manual_seed(0)
    return {f"head{i}": SparseCoder(ResidualMLPEncoder.upgrading(sae.encoder, hidden), sae.dictionary, l1_coeff=1.0,
                                    lr=1e-4, target_l0=8.0 * (i + 1), code_recovery=False) for i in range(n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--latents", type=int, default=2304)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", help="the cache's dtype")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = args.steps * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, part in enumerate(torch.randn(rows, args.d_model).split(16384)):
            files.append(Path(tmp) / f"train-{i:05d}.safetensors")
            save_shard(files[-1], "activations", part.to(getattr(torch, args.dtype)))

        def loader() -> DataLoader:
            return DataLoader(ShardedActivations(files, args.batch, shuffle=True, shuffle_buffer=65536),
                              batch_size=None)

        dictionary = Dictionary(args.latents, args.d_model, trainable=False, bias=True)
        sae = SparseCoder(create_encoder("linear", d_model=args.d_model, n_latents=args.latents,
                                         subtract_decoder_bias=True), dictionary)
        start = time.perf_counter()
        for _ in loader():
            pass
        data_seconds = time.perf_counter() - start

        start = time.perf_counter()
        for model in heads(args.heads, sae, args.hidden).values():
            trainer(args.steps).fit(model, loader())
        alone = time.perf_counter() - start

        start = time.perf_counter()
        trainer(args.steps).fit(HeadBank(heads(args.heads, sae, args.hidden)), loader())
        together = time.perf_counter() - start
    tokens = args.heads * rows
    print(f"{args.heads} residual-MLP heads (hidden {args.hidden}) on a frozen {args.latents} x {args.d_model} "
          "decoder, "
          f"{args.steps} steps of {args.batch} tokens from a {args.dtype} cache, {torch.get_num_threads()} threads")
    print(f"reading the data alone, one pass: {data_seconds:.2f} s")
    print(f"one by one:        {alone:7.2f} s  ({tokens / alone:,.0f} head-tokens/s)")
    print(f"one pass for all:  {together:7.2f} s  ({tokens / together:,.0f} head-tokens/s)")
    print(f"speed-up: {alone / together:.2f}x")


if __name__ == "__main__":
    main()
