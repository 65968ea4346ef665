"""Lightning's cost per step: SparseCoder under a Trainer against a plain PyTorch training loop.

Both train the same head on the same full batch with Adam for the same number of steps; the ratio
is the share of the plain loop's speed the Lightning module keeps. At the paper's tiny shapes
(N=16, M=8) a step is a few microseconds of arithmetic, so this is a worst case for overhead.
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import SyntheticSparseDataModule

HEADS = {"linear": {"bias": False}, "topk": {"k": 3}, "mlp": {"hidden": 256, "bias": False}}


def plain_loop(head, dictionary, x, steps):
    optim = torch.optim.Adam(head.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        codes = head(x, dictionary)
        loss = F.mse_loss(dictionary.decode(codes), x) + 0.01 * codes.abs().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    return steps / (time.perf_counter() - start)


def lightning_fit(head, dictionary, datamodule, steps):
    model = SparseCoder(head, dictionary)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--shape", default="16,8", help="n_latents,d_model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    n_latents, d_model = map(int, args.shape.split(","))
    dm = SyntheticSparseDataModule(n_latents=n_latents, d_model=d_model, k=3, steps_per_epoch=args.steps)
    dictionary = Dictionary.from_tensor(dm.dictionary)
    print(f"full-batch training, {len(dm.train_x)} samples, N={n_latents}, M={d_model}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'head':<8} {'plain steps/s':>14} {'Lightning steps/s':>18} {'ratio':>7}")
    for name, kwargs in HEADS.items():
        torch.manual_seed(0)
        plain = plain_loop(create_encoder(name, d_model=d_model, n_latents=n_latents, **kwargs), dictionary,
                           dm.train_x, args.steps)
        torch.manual_seed(0)
        lit = lightning_fit(create_encoder(name, d_model=d_model, n_latents=n_latents, **kwargs), dictionary, dm,
                            args.steps)
        print(f"{name:<8} {plain:>14.0f} {lit:>18.0f} {lit / plain:>7.2f}")


if __name__ == "__main__":
    main()
