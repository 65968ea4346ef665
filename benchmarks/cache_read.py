"""Reading the activation cache: safetensors shards (the cache's format: each shard loaded whole when
first needed, bfloat16 native) against memory-mapped ``.npy`` shards (its earlier format: bfloat16 kept
as uint16 bits), with the training reader's access pattern, side by side in one run.

The training reader permutes rows within windows of ``shuffle_buffer`` rows and gathers batches of
random rows; both readers below read every row once per pass, in the same order.

    python benchmarks/cache_read.py            # 4 shards x 65,536 rows x 576, float32 and bfloat16
    python benchmarks/cache_read.py --quick    # 2 shards x 16,384 rows

Prints rows/s per format and dtype, and the ratio safetensors / npy (at least 1: safetensors is no slower).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_zoo.data.activations import ACTIVATIONS, ShardedActivations, save_shard


def to_npy(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


#: the cache's inputs are scaled to a mean norm of sqrt(d_model): both readers apply a factor
SCALE = 1.7


def npy_pass(files: list[Path], dtype: str, batch_size: int, shuffle_buffer: int, seed: int = 0) -> int:
    """The earlier reader: memory-mapped shards, rows gathered front to back within each shard."""
    arrays = [np.load(f, mmap_mode="r") for f in files]
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    n, seen = int(offsets[-1]), 0
    rng = np.random.default_rng([seed, 0])
    order = np.concatenate([start + rng.permutation(min(shuffle_buffer, n - start)) for start in range(0, n, shuffle_buffer)])
    for start in range(0, n - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        shard = np.searchsorted(offsets, index, side="right") - 1
        out = np.empty((len(index), arrays[0].shape[1]), dtype=arrays[0].dtype)
        for s in np.unique(shard):
            where = shard == s
            local = index[where] - offsets[s]
            order_ = np.argsort(local)
            out[np.flatnonzero(where)[order_]] = arrays[s][local[order_]]
        t = torch.from_numpy(out)
        batch = (t.view(torch.int16).view(torch.bfloat16).float() if dtype == "bfloat16" else t.float()) * SCALE
        seen += len(batch)
    return seen


def safetensors_pass(files: list[Path], batch_size: int, shuffle_buffer: int) -> int:
    dataset = ShardedActivations(files, batch_size, scale=SCALE, shuffle=True, shuffle_buffer=shuffle_buffer)
    return sum(len(batch) for batch in dataset)


def best_of(fn, repeats: int = 3) -> tuple[float, int]:
    best, rows = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn()
        best = min(best, time.perf_counter() - start)
    return best, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_shards, rows, d_model = (2, 16_384, 576) if args.quick else (4, 65_536, 576)
    batch_size, shuffle_buffer = 4096, 2 * rows
    print(f"{n_shards} shards x {rows:,} rows x {d_model}, batches of {batch_size}, shuffle buffer {shuffle_buffer:,} "
          "rows (best of 3 passes; the files are in the page cache after the first)")
    print(f"{'dtype':<10} {'npy rows/s':>14} {'safetensors rows/s':>20} {'safetensors / npy':>18}")
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            npy, st = [], []
            for i in range(n_shards):
                x = torch.randn(rows, d_model, generator=generator)
                npy.append(Path(tmp) / f"{dtype}-{i}.npy")
                np.save(npy[-1], to_npy(x, dtype))
                st.append(Path(tmp) / f"{dtype}-{i}.safetensors")
                save_shard(st[-1], ACTIVATIONS, x.to(getattr(torch, dtype)))
            t_npy, n1 = best_of(lambda: npy_pass(npy, dtype, batch_size, shuffle_buffer))
            t_st, n2 = best_of(lambda: safetensors_pass(st, batch_size, shuffle_buffer))
            assert n1 == n2, (n1, n2)
            print(f"{dtype:<10} {n1 / t_npy:>14,.0f} {n2 / t_st:>20,.0f} {t_npy / t_st:>18.2f}")


if __name__ == "__main__":
    main()
