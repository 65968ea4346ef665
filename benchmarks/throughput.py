"""Training and inference throughput at LLM widths, each as a fraction of the hardware's own limit for
the same work, measured in the same run.

For every head, the dense matrix products its step needs (e.g. the five of a linear SAE's training
step: encoder forward and weight gradient, decoder forward, weight gradient and code gradient) are
timed alone with ``torch.matmul`` at the same shapes and dtype (the gated SAE's step has two more: its
gate path's reconstruction and that product's code gradient); ``B / (their summed time)`` is the head's
bound in tokens/s. Step and products are timed in turn within each repeat, and the least disturbed
repeat of each is kept, so that load from other processes moves both alike. A training step is the
library's own: ``SparseCoder.training_losses``, backward, Adam, and the decoder renormalisation.
Inference is ``SparseCoder.encode``.

    python benchmarks/throughput.py --quick                      # d_model 576, batch 1024: a minute on CPU
    python benchmarks/throughput.py                              # d_model 576, 768, 2048; batch 4096
    python benchmarks/throughput.py --device cuda --dtype bf16   # bf16 autocast on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import time
from collections.abc import Callable

import torch
from torch import nn

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.sparsity import calibrate_l0

Shape = tuple[int, int, int]  # (m, k, n): an (m, k) @ (k, n) product


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed call: load from other processes only ever adds time


def paired_seconds(fn: Callable[[], object], shapes: list[Shape], dtype: torch.dtype, device: str,
                   repeats: int) -> tuple[float, float]:
    """``fn``'s time and the summed time of the dense products ``shapes`` (each timed alone), measured in
    turn within each repeat so that both see the same load; the least disturbed of each."""
    operands = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
                for m, k, n in shapes]
    products = [functools.partial(torch.matmul, a, b) for a, b in operands]
    fn_times, bound_times = [], []
    for _ in range(repeats):
        fn_times.append(seconds_per_call(fn, device, 1, warmup=0 if fn_times else 1))
        bound_times.append(sum(seconds_per_call(p, device, 1, warmup=0 if bound_times else 1) for p in products))
    return min(fn_times), min(bound_times)


def linear_layers(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def training_products(model: SparseCoder, batch: int) -> list[Shape]:
    """The dense products of one training step: per encoder layer its forward, weight gradient and (but
    for the first layer) input gradient; the decoder's forward, weight gradient and code gradient; for
    the gated SAE, whose loss also reconstructs the input from the gate path through a frozen copy of
    the decoder, that product's forward and code gradient."""
    shapes: list[Shape] = []
    for i, layer in enumerate(linear_layers(model.encoder)):
        d_in, d_out = layer.in_features, layer.out_features
        shapes += [(batch, d_in, d_out), (d_out, batch, d_in)] + ([(batch, d_out, d_in)] if i else [])
    n, d = model.dictionary.n_latents, model.dictionary.d_model
    if model.encoder.name == "gated":  # its loss reconstructs from the gate alone: that forward, its code gradient
        shapes += [(batch, n, d), (batch, d, n)]
    return shapes + [(batch, n, d), (n, batch, d), (batch, d, n)]


def inference_products(model: SparseCoder, batch: int) -> list[Shape]:
    encoder = model.encoder
    if hasattr(encoder, "steps"):  # an iterative head: x D^T, then per step (s D) D^T
        n, d = model.dictionary.n_latents, model.dictionary.d_model
        return [(batch, d, n)] + [(batch, n, d), (batch, d, n)] * encoder.steps
    return [(batch, layer.in_features, layer.out_features) for layer in linear_layers(encoder)]


def make_heads(d_model: int, k: int, x: torch.Tensor) -> dict[str, Callable[[], SparseCoder]]:
    """Every head at ``n_latents = 32 x d_model``. The threshold heads come twice: as built (about half of
    their latents fire, as at the start of a run without a target L0) and with their thresholds shifted so
    that ``k`` fire per sample of ``x`` (where a run that targets L0 ``k`` spends its steps)."""
    n = 32 * d_model

    def coder(head: dict, atom_norms: bool | str = False, **kwargs) -> SparseCoder:
        return SparseCoder(create_encoder(d_model=d_model, n_latents=n, **head),
                           Dictionary(n, d_model, bias=True, atom_norms=atom_norms), code_recovery=False, **kwargs)

    def at_l0(model: SparseCoder) -> SparseCoder:
        calibrate_l0(model.encoder, x.to(model.dictionary.weight.device), model.dictionary, k)
        return model

    return {
        "linear SAE": lambda: coder({"name": "linear", "subtract_decoder_bias": True}),
        f"top-k SAE (k={k}), dense decode": lambda: coder({"name": "topk", "k": k, "subtract_decoder_bias": True},
                                                          sparse_decode=False),
        f"top-k SAE (k={k}), sparse decode": lambda: coder({"name": "topk", "k": k, "subtract_decoder_bias": True}),
        f"top-k SAE (k={k}) + AuxK": lambda: coder({"name": "topk", "k": k, "subtract_decoder_bias": True},
                                                   auxk_coeff=1 / 32, dead_tokens=1),  # unfired latents are dead
        f"BatchTopK SAE (k={k})": lambda: coder({"name": "batchtopk", "k": k, "subtract_decoder_bias": True}),
        f"Matryoshka BatchTopK (k={k})": lambda: coder({"name": "batchtopk", "k": k, "subtract_decoder_bias": True},
                                                       matryoshka_widths=[n // 16, n // 4, n]),
        f"Matryoshka BatchTopK (k={k}), learned norms": lambda: coder(
            {"name": "batchtopk", "k": k, "subtract_decoder_bias": True}, atom_norms="learned",
            matryoshka_widths=[n // 16, n // 4, n]),
        "JumpReLU SAE, as built": lambda: coder({"name": "jumprelu", "subtract_decoder_bias": True}),
        f"JumpReLU SAE, at L0 {k}": lambda: at_l0(coder({"name": "jumprelu", "subtract_decoder_bias": True})),
        "gated SAE, as built": lambda: coder({"name": "gated", "subtract_decoder_bias": True}),
        f"gated SAE, at L0 {k}": lambda: at_l0(coder({"name": "gated", "subtract_decoder_bias": True})),
        f"MLP head (hidden {4 * d_model})": lambda: coder({"name": "mlp", "hidden": 4 * d_model}),
    }


def mixed_precision(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``--dtype bf16``, else nothing."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"


def benchmark(d_model: int, batch: int, k: int, fista_steps: int, device: str, dtype: str, repeats: int,
              speeds: dict[str, float], only: list[str] | None = None) -> list[list[str]]:
    autocast = functools.partial(mixed_precision, device, dtype)
    matmul_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    x = torch.randn(batch, d_model, device=device)
    rows = []
    heads = {label: build for label, build in make_heads(d_model, k, x).items()
             if only is None or any(word.lower() in label.lower() for word in only)}
    for label, build in heads.items():
        model = build().to(device)
        optimizer = model.configure_optimizers()

        def train_step() -> None:
            with autocast():
                loss = model.training_losses(x)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.dictionary.normalize_()

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step, bound = paired_seconds(train_step, training_products(model, batch), matmul_dtype, device, repeats)
        speeds[label] = batch / step
        rows.append([str(d_model), label, "train", f"{batch / step:,.0f}", f"{batch / bound:,.0f}",
                     f"{bound / step:.0%}", peak_memory(device)])
    inference = {label: build for label, build in heads.items() if "dense decode" not in label}
    if only is None or any(word.lower() in "fista" for word in only):
        inference[f"FISTA ({fista_steps} steps)"] = lambda: SparseCoder(
            create_encoder("fista", d_model=d_model, n_latents=32 * d_model, steps=fista_steps),
            Dictionary(32 * d_model, d_model, bias=True), code_recovery=False)
    for label, build in inference.items():
        model = build().to(device).eval()

        def encode() -> None:
            with torch.inference_mode(), autocast():
                model.encode(x)

        seconds, bound = paired_seconds(encode, inference_products(model, batch), matmul_dtype, device, repeats)
        rows.append([str(d_model), label.replace(", sparse decode", ""), "inference", f"{batch / seconds:,.0f}",
                     f"{batch / bound:,.0f}", f"{bound / seconds:.0%}", peak_memory(device)])
    return rows


def field_steps(d_model: int, batch: int, k: int, device: str, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Training steps of the libraries people use, at the same shapes (those installed): SAELens's
    standard and top-k training SAEs, EleutherAI sparsify's top-k SAE; Adam for all, as for ours."""
    n, steps = 32 * d_model, {}
    try:
        from sae_lens import (StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                              TopKTrainingSAEConfig)
        from sae_lens.saes.sae import TrainStepInput

        for label, sae in (("SAELens StandardTrainingSAE", StandardTrainingSAE(StandardTrainingSAEConfig(
                                d_in=d_model, d_sae=n, device=device))),
                           (f"SAELens TopKTrainingSAE (k={k})", TopKTrainingSAE(TopKTrainingSAEConfig(
                               d_in=d_model, d_sae=n, k=k, device=device)))):
            steps[label] = _torch_step(sae, lambda sae=sae: sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients=sae.get_coefficients() and {name: 1.0 for name in sae.get_coefficients()},
                dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)).loss)
    except ImportError:
        print("SAELens is not installed (pip install sae-lens): no SAELens rows")
    try:
        from sparsify import SparseCoder as SparsifyCoder
        from sparsify import SparseCoderConfig

        sae = SparsifyCoder(d_model, SparseCoderConfig(num_latents=n, k=k), device=device)
        steps[f"sparsify SparseCoder (k={k})"] = _torch_step(sae, lambda: sae(x).fvu, after_backward=(
            sae.remove_gradient_parallel_to_decoder_directions), after_step=sae.set_decoder_norm_to_unit_norm)
    except ImportError:
        print("sparsify is not installed (pip install eai-sparsify): no sparsify row")
    return steps


def _torch_step(module: nn.Module, loss: Callable[[], torch.Tensor], after_backward: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None) -> Callable[[], None]:
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

    def step() -> None:
        loss().backward()
        if after_backward:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step:
            after_step()

    return step


def compare_with_the_field(d_model: int, batch: int, k: int, device: str, dtype: str, repeats: int,
                           ours: dict[str, float]) -> list[list[str]]:
    autocast = functools.partial(mixed_precision, device, dtype)
    x = torch.randn(batch, d_model, device=device)
    rows = []
    for label, step in field_steps(d_model, batch, k, device, x).items():
        mine = ours.get("linear SAE" if "Standard" in label else f"top-k SAE (k={k}), sparse decode")
        if mine is None:  # --heads left our head of this comparison out
            continue

        def run(step=step) -> None:
            with autocast():
                step()

        speed = batch / seconds_per_call(run, device, repeats)
        rows.append([str(d_model), label, f"{speed:,.0f}", f"{mine / speed:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d_model 576 only, batch 1024, 10 FISTA steps")
    parser.add_argument("--d-models", default="576,768,2048")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--fista-steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, bf16 bound")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-field", action="store_true", help="skip the SAELens / sparsify comparison")
    parser.add_argument("--heads", default=None, help="only the heads whose name contains one of these "
                        "comma-separated words, e.g. BatchTopK,JumpReLU")
    args = parser.parse_args()
    if args.quick:
        args.d_models, args.batch, args.fista_steps, args.repeats = "576", 1024, 10, 5
    torch.set_float32_matmul_precision("highest")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{device_name}, torch {torch.__version__}, {args.dtype}, batch {args.batch} tokens, n_latents = 32 x d_model")
    print("bound: the step's dense products timed alone with torch.matmul (same shapes and dtype)\n")
    header = ["d_model", "head", "step", "tokens/s", "bound tokens/s", "of bound", "peak memory"]
    rows, field = [], []
    for d_model in (int(d) for d in args.d_models.split(",")):
        speeds: dict[str, float] = {}
        rows += benchmark(d_model, args.batch, args.k, args.fista_steps, args.device, args.dtype, args.repeats, speeds,
                          args.heads.split(",") if args.heads else None)
        if not args.no_field:
            field += compare_with_the_field(d_model, args.batch, args.k, args.device, args.dtype, args.repeats, speeds)
    print_rows(header, rows)
    if field:
        print("\nThe same training steps in the libraries people use, measured in this run (ours: linear SAE "
              "against SAELens's standard SAE, sparse-decode top-k against the top-k SAEs):\n")
        print_rows(["d_model", "library step", "tokens/s", "sae_zoo / it"], field)


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
