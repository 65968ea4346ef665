"""Folders saved by an earlier sae_zoo (``tests/fixtures/saved_models``, written by its ``write.py``) keep
loading, with the codes and outputs they gave when they were written."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_zoo import SparseCoder
from sae_zoo.hub import load_sae
from sae_zoo.hub.run import load_run

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved_models"
EXPECTED = load_file(SAVED / "expected.safetensors")


def check_outputs(model: SparseCoder, name: str, x: torch.Tensor) -> None:
    with torch.no_grad():
        out = model.eval()(x)
    torch.testing.assert_close(out.codes, EXPECTED[f"{name}.codes"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.x_hat, EXPECTED[f"{name}.x_hat"], rtol=0, atol=1e-6)
    assert (EXPECTED[f"{name}.codes"] != 0).any(dim=-1).all()  # every sample has codes: the check can fail


def test_a_run_folder_with_model_ckpt_loads_as_it_was_saved():
    model, recipe, metrics = load_run(SAVED / "run")
    check_outputs(model, "run", EXPECTED["x"])
    assert model.dictionary.learns_norms and not torch.equal(model.dictionary.atom_norms.detach(), torch.ones(24))
    assert recipe["model"]["matryoshka_widths"] == [6, 12, 24] and metrics["steps"] == 40
    check_outputs(load_sae(SAVED / "run").model(), "run", EXPECTED["x"])


def test_a_pretrained_folder_with_learned_norms_loads_as_it_was_saved():
    model = SparseCoder.from_pretrained(SAVED / "pretrained_norms")
    assert model.dictionary.learns_norms and model.encoder.name == "jumprelu"
    check_outputs(model, "pretrained_norms", EXPECTED["x"])


def test_a_skip_transcoder_loads_as_it_was_saved():
    model = SparseCoder.from_pretrained(SAVED / "skip_transcoder")
    assert model.skip is not None and model.skip.weight.abs().sum() > 0
    check_outputs(model, "skip_transcoder", EXPECTED["x_transcoder"])
    check_outputs(load_sae(SAVED / "skip_transcoder").model(), "skip_transcoder", EXPECTED["x_transcoder"])
