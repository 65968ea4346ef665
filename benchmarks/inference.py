"""Inference cost of every head at LLM scale: wall time and FLOPs per sample, with ratios to the SAE.

    python benchmarks/inference.py [--d-model 768] [--n-latents 16384] [--batch 4096] [--device cpu]

Iterative heads run a fixed, small number of iterations (``--iterations``) so that the table shows
the cost per iteration; multiply for a full solve. All heads are timed in the same run, on the same
inputs and dictionary. On a GPU, pass ``--device cuda``.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_zoo import Dictionary, create_encoder, flops


def heads(iterations: int) -> dict[str, dict]:
    return {"linear": {}, "topk": {"k": 32}, "mlp": {"hidden": 4224}, "lista": {"layers": 3},
            "ista": {"steps": iterations}, "fista": {"steps": iterations}, "lca": {"steps": iterations},
            "ito": {"steps": iterations}}


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-latents", type=int, default=16_384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    m, n, device = args.d_model, args.n_latents, args.device
    dictionary = Dictionary(n, m, trainable=False).to(device)
    x = torch.randn(args.batch, m, device=device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"inference, d_model={m}, n_latents={n}, batch {args.batch}, {name}, float32, "
          f"iterative heads at {args.iterations} iterations")
    print(f"{'head':<8} {'ms/batch':>10} {'us/sample':>10} {'GFLOP/sample':>13} {'GFLOP/s':>9} {'time/SAE':>9} "
          f"{'FLOPs/SAE':>10}")
    reference = None
    for head_name, kwargs in heads(args.iterations).items():
        head = create_encoder(head_name, d_model=m, n_latents=n, **kwargs).to(device).eval()
        with torch.no_grad():
            seconds = timed(lambda: dictionary.decode(head(x, dictionary)), device, args.repeats)
        per_sample = flops.inference_flops(head)
        reference = reference or (seconds, per_sample)
        print(f"{head_name:<8} {seconds * 1e3:>10.1f} {seconds / args.batch * 1e6:>10.2f} {per_sample / 1e9:>13.4f} "
              f"{per_sample * args.batch / seconds / 1e9:>9.1f} {seconds / reference[0]:>9.2f} "
              f"{per_sample / reference[1]:>10.2f}")


if __name__ == "__main__":
    main()
