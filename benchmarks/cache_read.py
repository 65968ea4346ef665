"""Reading the activation cache: ``.npy`` shards (memory-mapped, bfloat16 kept as uint16 bits) against
safetensors shards (bfloat16 native), with the training reader's access pattern, side by side.

The training reader (``ShardedActivations``) permutes rows within windows of ``shuffle_buffer`` rows and
gathers batches of random rows. ``.npy`` shards are memory-mapped and gathered row by row; safetensors
has no memory-mapped fancy indexing, so each shard is loaded whole (``safe_open``) the first time a
window needs it and rows are gathered from memory. Both read every row once per pass.

    python benchmarks/cache_read.py            # 4 shards x 65,536 rows x 576, float32 and bfloat16
    python benchmarks/cache_read.py --quick    # 2 shards x 16,384 rows

Prints rows/s per format and dtype and the ratio safetensors / npy (above 1: safetensors is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_zoo.data.activations import ShardedActivations, _to_numpy


def write_shards(folder: Path, n_shards: int, rows: int, d_model: int, dtype: str) -> tuple[list[Path], list[Path]]:
    npy, st = [], []
    generator = torch.Generator().manual_seed(0)
    for i in range(n_shards):
        x = torch.randn(rows, d_model, generator=generator)
        npy.append(folder / f"{dtype}-{i}.npy")
        np.save(npy[-1], _to_numpy(x, dtype))
        st.append(folder / f"{dtype}-{i}.safetensors")
        save_file({"x": x.to(getattr(torch, dtype)).contiguous()}, str(st[-1]))
    return npy, st


def read_npy(files: list[Path], dtype: str, batch_size: int, shuffle_buffer: int) -> int:
    dataset = ShardedActivations(files, dtype, batch_size, shuffle=True, shuffle_buffer=shuffle_buffer)
    return sum(len(batch) for batch in dataset)


def read_safetensors(files: list[Path], batch_size: int, shuffle_buffer: int) -> int:
    shapes = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            shapes.append(handle.get_slice("x").get_shape()[0])
    offsets = np.cumsum([0, *shapes])
    n, loaded, seen = int(offsets[-1]), {}, 0
    rng = np.random.default_rng(0)
    order = np.concatenate([start + rng.permutation(min(shuffle_buffer, n - start)) for start in range(0, n, shuffle_buffer)])
    for start in range(0, n - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        shard = np.searchsorted(offsets, index, side="right") - 1
        parts = []
        for s in np.unique(shard):
            if s not in loaded:
                with safe_open(str(files[s]), framework="pt") as handle:
                    loaded[s] = handle.get_tensor("x")
            where = np.flatnonzero(shard == s)
            parts.append((where, loaded[s][torch.from_numpy(index[where] - offsets[s])].float()))
        batch = torch.empty(len(index), parts[0][1].shape[1])
        for where, rows in parts:
            batch[torch.from_numpy(where)] = rows
        seen += len(batch)
    return seen


def timed(fn, repeats: int = 3) -> tuple[float, int]:
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
    print(f"{n_shards} shards x {rows:,} rows x {d_model}, batches of {batch_size}, shuffle buffer {shuffle_buffer:,} rows "
          "(best of 3 passes; the files are in the page cache after the first)")
    print(f"{'dtype':<10} {'npy rows/s':>14} {'safetensors rows/s':>20} {'safetensors / npy':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            npy, st = write_shards(Path(tmp), n_shards, rows, d_model, dtype)
            check = ShardedActivations(npy, dtype, batch_size).rows(np.arange(3))
            with safe_open(str(st[0]), framework="pt") as handle:
                assert torch.equal(check, handle.get_tensor("x")[:3].float()), "the two formats hold different rows"
            t_npy, n1 = timed(lambda: read_npy(npy, dtype, batch_size, shuffle_buffer))
            t_st, n2 = timed(lambda: read_safetensors(st, batch_size, shuffle_buffer))
            assert n1 == n2
            print(f"{dtype:<10} {n1 / t_npy:>14,.0f} {n2 / t_st:>20,.0f} {t_npy / t_st:>18.2f}")


if __name__ == "__main__":
    main()
