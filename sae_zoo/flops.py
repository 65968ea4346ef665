"""FLOPs accounting, per sample, counted the way the paper counts them.

A multiply-add is 2 FLOPs, an element-wise operation 1. Each head reports what encoding one
sample costs as ``encode_flops() -> (matmul, elementwise)``; decoding adds ``2 M N``. So the
paper's SAE costs ``4MN + N`` at inference, and its training step ``10MN + 5N`` (``13MN + 5N``
when the dictionary is learned): the rule used here for every trainable head is

    training step = 2.5 * (encode matmuls + decode) + 5 * encode element-wise  (+ 3MN if D is learned)

which gives the paper's SAE figures exactly. ``M = d_model``, ``N = n_latents``.
"""

from __future__ import annotations

from typing import Any

# This module imports nothing from sae_zoo, so that every head can count its FLOPs with it. A
# ``head`` below is any EncoderHead: it has ``d_model``, ``n_latents``, ``encode_flops()``,
# ``training_encode_flops()`` and ``trained_part()``.


def sae_inference(d_model: int, n_latents: int) -> int:
    """The paper's SAE inference FLOPs per sample: ``4MN + N``."""
    return 4 * d_model * n_latents + n_latents


def sae_training_step(d_model: int, n_latents: int, learn_dictionary: bool = False) -> int:
    """The paper's SAE training-step FLOPs per sample: ``10MN + 5N``, or ``13MN + 5N`` with a learned D."""
    return (13 if learn_dictionary else 10) * d_model * n_latents + 5 * n_latents


def mlp_inference(d_model: int, n_latents: int, hidden: int) -> int:
    """The paper's one-hidden-layer MLP inference FLOPs per sample: ``2Mh + h + 2hN + N + 2NM``."""
    return 2 * d_model * hidden + hidden + 2 * hidden * n_latents + n_latents + 2 * n_latents * d_model


def ito_inference(d_model: int, n_latents: int, steps: int) -> int:
    """The paper's ITO FLOPs per sample: ``MN + N + steps (4MN + 2M + 11N)``."""
    m, n = d_model, n_latents
    return m * n + n + steps * (4 * m * n + 2 * m + 11 * n)


def decode_flops(d_model: int, n_latents: int) -> int:
    return 2 * d_model * n_latents


def inference_flops(head: Any) -> float:
    """FLOPs to encode and decode one sample with ``head``."""
    matmul, elementwise = head.encode_flops()
    return float(matmul + elementwise + decode_flops(head.d_model, head.n_latents))


def training_step_flops(head: Any, learn_dictionary: bool = False) -> float:
    """FLOPs of one training step per sample (0 for a head with nothing to train and a fixed dictionary)."""
    m, n = head.d_model, head.n_latents
    dictionary_update = 3 * m * n if learn_dictionary else 0
    trained = head.trained_part()
    if trained is None or not any(p.requires_grad for p in trained.parameters()):
        return float(dictionary_update + (inference_flops(head) if learn_dictionary else 0))
    matmul, elementwise = trained.training_encode_flops()
    return float(2.5 * (matmul + decode_flops(m, n)) + 5 * elementwise + dictionary_update)


def total_flops(head: Any, n_train: int, steps: int, n_test: int, learn_dictionary: bool = False) -> float:
    """Training (``steps`` full-batch steps over ``n_train`` samples) plus inference on ``n_test`` samples."""
    return n_train * steps * training_step_flops(head, learn_dictionary) + n_test * inference_flops(head)
