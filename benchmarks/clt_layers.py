"""Step time and peak memory of a cross-layer transcoder's training step against the number of layers it spans
(1, 2, 4, 8 by default), beside a set of per-layer transcoders of the same width (a CLT of one layer each), measured
side by side in one run. The decoders grow with the square of the layer count (``n (n + 1) / 2`` blocks of
``d_transcoder x d_model``) and the encoders linearly, which the parameter counts show next to the measurements.

    python benchmarks/clt_layers.py                       # d_model 576, 2304 latents per layer, top-k 32, CPU
    python benchmarks/clt_layers.py --device cuda --d-transcoder 16384 --batch 4096

On a CPU each configuration runs in a process of its own, so that the peak resident memory is that configuration's
(``--in-process`` measures them all in this one, without memory); on CUDA they run in this process, each with its own
``torch.cuda.max_memory_allocated``. Prints a table: layers, parameters, step ms, peak MiB, and the ratios to the
one-layer CLT and to the per-layer set.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(n_layers: int, args: argparse.Namespace, per_layer: bool) -> dict:
    import torch

    from sae_zoo import CrossLayerTranscoder

    torch.manual_seed(0)
    device = torch.device(args.device)
    spec = {"name": args.head, **({"k": args.k} if args.head in ("topk", "batchtopk") else {})}
    # the per-layer set: n one-layer CLTs (per-layer transcoders), trained side by side on the same rows
    models = ([CrossLayerTranscoder.create(1, args.d_model, args.d_transcoder, spec) for _ in range(n_layers)]
              if per_layer else [CrossLayerTranscoder.create(n_layers, args.d_model, args.d_transcoder, spec)])
    params = sum(p.numel() for m in models for p in m.parameters())
    models = [m.to(device).train() for m in models]
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models]
    x = torch.randn(args.batch, n_layers, args.d_model, device=device)
    target = torch.randn(args.batch, n_layers, args.d_model, device=device)

    def step() -> None:
        for i, (model, optimizer) in enumerate(zip(models, optimizers)):
            rows = slice(i, i + 1) if per_layer else slice(None)
            terms = model.loss_terms(x[:, rows], target[:, rows])
            loss = sum(v for k, v in terms.items() if k not in ("l0", "per_layer_mse"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # the process's peak: this configuration's only in a process of its own
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 if not args.in_process else float("nan")
    return {"layers": n_layers, "per_layer": per_layer, "params": params,
            "step_ms": 1e3 * (time.perf_counter() - start) / args.steps, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="1,2,4,8")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-transcoder", type=int, default=2304)
    parser.add_argument("--head", default="topk")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--in-process", action="store_true", help="CPU: every configuration in this process (no "
                                                                    "memory figure)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "layers,per_layer": measure one, print JSON
    args = parser.parse_args()
    if args.one:
        n, per_layer = args.one.split(",")
        print(json.dumps(measure(int(n), args, per_layer == "1")))
        return
    args.in_process = args.in_process or args.device.startswith("cuda")
    rows = []
    for n in (int(v) for v in args.layers.split(",")):
        for per_layer in (False, True):
            if args.in_process:
                rows.append(measure(n, args, per_layer))
            else:
                command = [sys.executable, __file__, *sys.argv[1:], "--one", f"{n},{int(per_layer)}"]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()
                rows.append(json.loads(out[-1]))
            print(f"measured {n} layer(s), {'per-layer set' if per_layer else 'CLT'}", file=sys.stderr)
    base = next(r for r in rows if r["layers"] == rows[0]["layers"] and not r["per_layer"])
    print(f"{args.device}, d_model {args.d_model}, {args.d_transcoder} latents per layer, {args.head}"
          f"{f' k={args.k}' if args.head in ('topk', 'batchtopk') else ''}, batch {args.batch}, {args.steps} steps")
    print("| layers | model | parameters (M) | step (ms) | peak memory (MiB) | step / 1-layer CLT | "
          "step / per-layer set |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pair = next(o for o in rows if o["layers"] == r["layers"] and o["per_layer"] != r["per_layer"])
        ratio = r["step_ms"] / pair["step_ms"] if not r["per_layer"] else 1.0
        print(f"| {r['layers']} | {'per-layer set' if r['per_layer'] else 'CLT'} | {r['params'] / 1e6:.2f} | "
              f"{r['step_ms']:.1f} | {r['peak_mib']:.0f} | {r['step_ms'] / base['step_ms']:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
