"""Transcoders of other libraries load giving their outputs exactly: SAELens's four architectures (against its
own classes), sparsify's transcoders and skip-transcoders (against its formula, older configs included), Gemma
Scope 2's (against Google's formula, ``x @ affine_skip_connection``); and ours export to SAELens's format."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_zoo.hub import export_saelens, load_sae

D_IN, D_SAE, D_OUT = 6, 20, 4


def randomised(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder", "jumprelu_transcoder",
                                          "jumprelu_skip_transcoder"])
def test_saelens_transcoders_load_with_its_outputs(tmp_path, architecture):
    transcoder = pytest.importorskip("sae_lens.saes.transcoder")
    classes = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
               "jumprelu_transcoder": "JumpReLUTranscoder", "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}
    cls, config = getattr(transcoder, classes[architecture]), getattr(transcoder, classes[architecture] + "Config")
    theirs = randomised(cls(config(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False)),
                        torch.Generator().manual_seed(0))
    theirs.save_model(tmp_path / architecture)
    sae = load_sae(tmp_path / architecture)
    assert sae.transcoder and (sae.skip is not None) == ("skip" in architecture)
    ours = sae.model()
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x)
        output, codes = ours(x)
        torch.testing.assert_close(codes, theirs.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    assert (codes > 0).float().mean() > 0.1  # the data exercise the activation

    # exported back, SAELens reads our model as its own architecture, with the same outputs
    back = export_saelens(ours, tmp_path / "exported")
    assert json.loads((back / "cfg.json").read_text())["architecture"] == architecture
    from sae_lens import SAE

    with torch.no_grad():
        torch.testing.assert_close(SAE.load_from_disk(str(back))(x), expected, atol=1e-5, rtol=1e-5)


def write_sparsify(path: Path, tensors: dict, **cfg) -> Path:
    """As sparsify's ``SparseCoder.save_to_disk``: its tensors, and ``{**cfg.to_dict(), "d_in"}``."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_SAE, "k": 3, **cfg,
                                               "d_in": D_IN}))
    return path


def sparsify_output(tensors: dict, x: torch.Tensor, subtract_b_dec: bool) -> torch.Tensor:
    """sparsify's forward: top-k of ReLU(encoder(x [- b_dec])), decoded, plus x @ W_skip.T."""
    pre = F.relu(F.linear(x - tensors["b_dec"] if subtract_b_dec else x, tensors["encoder.weight"],
                          tensors["encoder.bias"]))
    acts, idx = pre.topk(3, dim=-1)
    out = (acts[..., None] * tensors["W_dec"][idx]).sum(-2) + tensors["b_dec"]
    return out + x @ tensors["W_skip"].T if "W_skip" in tensors else out


def test_sparsify_transcoders_and_older_skip_transcoders(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g), "encoder.bias": torch.randn(D_SAE, generator=g),
               "W_dec": F.normalize(torch.randn(D_SAE, D_IN, generator=g), dim=-1), "b_dec": torch.randn(D_IN, generator=g)}
    skip = {**tensors, "W_skip": torch.randn(D_IN, D_IN, generator=g)}
    x = torch.randn(32, D_IN, generator=g)
    cases = {"transcoder": (tensors, {"transcode": True}, False),
             "skip": (skip, {"transcode": True, "skip_connection": True}, False),
             "older_skip": (skip, {"skip_connection": True}, False),  # before the 'transcode' key: a transcoder
             "sae": (tensors, {"transcode": False}, True)}
    for name, (weights, cfg, is_sae) in cases.items():
        sae = load_sae(write_sparsify(tmp_path / name / "model.layers.3.mlp", weights, **cfg))
        assert sae.transcoder != is_sae, name
        with torch.no_grad():
            torch.testing.assert_close(sae.model()(x).x_hat, sparsify_output(weights, x, subtract_b_dec=is_sae),
                                       atol=1e-5, rtol=1e-5, msg=name)
    assert "predates sparsify's 'transcode' key" in load_sae(tmp_path / "older_skip" / "model.layers.3.mlp").metadata["note"]
    with pytest.raises(ValueError, match="'transcode' is false, but the file has a skip term"):
        load_sae(write_sparsify(tmp_path / "bad", skip, transcode=False))


def write_gemma_scope_2(path: Path, tensors: dict, **cfg) -> Path:
    """As Gemma Scope 2's repos lay a transcoder out: ``config.json`` and ``params.safetensors``."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "params.safetensors"))
    config = {"hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output", "width": D_SAE,
              "model_name": "google/gemma-3-270m", "architecture": "jump_relu", "l0": 18, "type": "transcoder", **cfg}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_gemma_scope_2_transcoders_read_the_skip_matrix_as_x_at_a(tmp_path):
    """Google's example code and circuit-tracer compute ``x @ affine_skip_connection``; a transposed reading gives
    other outputs on these data, so a change of reading cannot pass unnoticed."""
    g = torch.Generator().manual_seed(3)
    d = D_IN  # Gemma's MLPs read and write the residual width: the skip matrix is square, both readings fit
    tensors = {"w_enc": torch.randn(d, D_SAE, generator=g), "w_dec": torch.randn(D_SAE, d, generator=g),
               "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(d, generator=g),
               "threshold": torch.rand(D_SAE, generator=g), "affine_skip_connection": torch.randn(d, d, generator=g)}
    sae = load_sae(write_gemma_scope_2(tmp_path / "transcoder_all" / "layer_5_width_16k_l0_small_affine", tensors,
                                       affine_connection=True))
    assert sae.format == "gemma_scope_2" and sae.transcoder
    assert sae.metadata["hook_name_out"] == "model.layers.5.post_feedforward_layernorm.output"
    x = torch.randn(64, d, generator=g)
    z = x @ tensors["w_enc"] + tensors["b_enc"]
    codes = F.relu(z) * (z > tensors["threshold"])
    google = codes @ tensors["w_dec"] + tensors["b_dec"] + x @ tensors["affine_skip_connection"]
    transposed = google - x @ tensors["affine_skip_connection"] + x @ tensors["affine_skip_connection"].T
    with torch.no_grad():
        ours = sae.model()(x)
    torch.testing.assert_close(ours.codes, codes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.x_hat, google, atol=1e-4, rtol=1e-5)
    assert (ours.x_hat - transposed).abs().mean() > 0.5  # the other reading is far off

    plain = load_sae(write_gemma_scope_2(tmp_path / "transcoder" / "layer_5",
                                         {k: v for k, v in tensors.items() if k != "affine_skip_connection"}))
    assert plain.transcoder and plain.skip is None
    with pytest.raises(ValueError, match="affine_skip_connection"):
        load_sae(write_gemma_scope_2(tmp_path / "missing", {k: v for k, v in tensors.items()
                                                             if k != "affine_skip_connection"}, affine_connection=True))
