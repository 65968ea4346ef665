"""Transcoders of other libraries load giving their outputs exactly: SAELens's four architectures (against its
own classes), sparsify's transcoders and skip-transcoders (against its formula, older configs included), Gemma
Scope 2's (against Google's formula, ``x @ affine_skip_connection``); and ours export to SAELens's format."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

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


def write_circuit_tracer(folder: Path, layer: int, tensors: dict, **config) -> Path:
    """As circuit-tracer keeps a per-layer transcoder set: ``SingleLayerTranscoder``'s state dict in
    ``layer_{N}.safetensors`` and a ``config.yaml`` listing the files."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"layer_{layer}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-2-2b", "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "scan": "gemma-2-2b", "transcoders": [f"layer_{layer}.safetensors"],
        **config}))
    return folder


def circuit_tracer_tensors(g: torch.Generator, threshold: bool = True, skip: bool = True) -> dict:
    tensors = {"W_enc": torch.randn(D_SAE, D_IN, generator=g), "W_dec": torch.randn(D_SAE, D_OUT, generator=g),
               "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_OUT, generator=g)}
    if skip:
        tensors["W_skip"] = torch.randn(D_OUT, D_IN, generator=g)
    if threshold:
        tensors["activation_function.threshold"] = torch.rand(D_SAE, generator=g)
    return tensors


def circuit_tracer_output(tensors: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's ``SingleLayerTranscoder``: ``f(F.linear(x, W_enc, b_enc))`` with its JumpReLU
    ``z * (z > threshold)`` (no ReLU) or ReLU, then ``codes @ W_dec + b_dec + x @ W_skip.T``."""
    z = F.linear(x, tensors["W_enc"], tensors["b_enc"])
    threshold = tensors.get("activation_function.threshold")
    codes = z * (z > threshold) if threshold is not None else F.relu(z)
    out = codes @ tensors["W_dec"] + tensors["b_dec"]
    return codes, out + x @ tensors["W_skip"].T if "W_skip" in tensors else out


@pytest.mark.parametrize("threshold, skip", [(True, True), (False, False), (True, False)])
def test_circuit_tracer_per_layer_transcoders_load_with_its_outputs(tmp_path, threshold, skip):
    g = torch.Generator().manual_seed(4)
    tensors = circuit_tracer_tensors(g, threshold, skip)
    sae = load_sae(write_circuit_tracer(tmp_path / "set", 3, tensors), layer=3)
    assert sae.format == "circuit_tracer" and sae.transcoder and (sae.skip is not None) == skip
    assert sae.metadata["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert sae.metadata["hook_name_out"] == "blocks.3.hook_mlp_out"
    x = torch.randn(64, D_IN, generator=g)
    codes, out = circuit_tracer_output(tensors, x)
    with torch.no_grad():
        ours = sae.model()(x)
    torch.testing.assert_close(ours.codes, codes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.x_hat, out, atol=1e-4, rtol=1e-5)
    assert (codes > 0).float().mean() > 0.1


def test_circuit_tracer_files_sae_zoo_cannot_reproduce_are_refused(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = circuit_tracer_tensors(g)
    folder = write_circuit_tracer(tmp_path / "set", 0, tensors)
    with pytest.raises(ValueError, match=r"circuit-tracer's folders hold one transcoder per layer .*pass layer=N"):
        load_sae(folder)
    negative = {**tensors, "activation_function.threshold": tensors["activation_function.threshold"] - 0.5}
    with pytest.raises(ValueError, match=r"thresholds are below 0; circuit-tracer's JumpReLU \(z \* \(z > threshold\), "
                                         r"no ReLU\) then gives negative codes"):
        load_sae(write_circuit_tracer(tmp_path / "negative", 0, negative), layer=0)
    wrong = {**tensors, "W_skip": tensors["W_skip"].T.contiguous()}   # (d_in, d_out): the transposed skip matrix
    with pytest.raises(ValueError, match=r"layer_0.safetensors: tensor 'W_skip' has shape \(6, 4\), expected \(4, 6\)"):
        load_sae(write_circuit_tracer(tmp_path / "wrong", 0, wrong), layer=0)
    with pytest.raises(ValueError, match=r"model_kind 'cross_layer_transcoder'"):
        load_sae(write_circuit_tracer(tmp_path / "clt", 0, tensors, model_kind="cross_layer_transcoder"), layer=0)


def test_a_transcoder_exports_to_circuit_tracer_layer_by_layer(tmp_path):
    """Exported with its data's scales folded in, circuit-tracer's formula on the files gives the model's outputs on
    raw activations; exporting two layers into one folder lists both in its config."""
    from sae_zoo import Dictionary, SparseCoder, create_encoder
    from sae_zoo.hub import export_circuit_tracer

    g = torch.Generator().manual_seed(6)
    scales = {"input_scale": 2.0, "target_scale": 0.25}
    models = {}
    for layer in (2, 3):
        model = SparseCoder(create_encoder("jumprelu", d_model=D_IN, n_latents=D_SAE, threshold_init=0.2),
                            Dictionary(D_SAE, D_OUT, bias=True), transcoder=True, skip_connection=True)
        randomised(model, g)
        with torch.no_grad():
            model.encoder.threshold.abs_()
        model.dictionary.provenance.update({"hook_name": f"blocks.{layer}.ln2.hook_normalized",
                                            "hook_name_out": f"blocks.{layer}.hook_mlp_out", **scales})
        models[layer] = model.eval()
        export_circuit_tracer(model, tmp_path / "set", layer)
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["transcoders"] == ["layer_2.safetensors", "layer_3.safetensors"]
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    x = torch.randn(64, D_IN, generator=g)
    for layer, model in models.items():
        files = load_file(str(tmp_path / "set" / f"layer_{layer}.safetensors"))
        assert files["W_enc"].shape == (D_SAE, D_IN)
        codes, out = circuit_tracer_output(files, x)
        with torch.no_grad():
            ours = model(x * scales["input_scale"])
        torch.testing.assert_close(codes, ours.codes, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, ours.x_hat / scales["target_scale"], atol=1e-3, rtol=1e-4)
        assert (codes > 0).any()
    with pytest.raises(ValueError, match=r"feature_input_hook and feature_output_hook: circuit-tracer names the hooks "
                                         r"per layer .* are not blocks.4.NAME, so pass them"):
        export_circuit_tracer(models[2], tmp_path / "set", 4)
    with pytest.raises(ValueError, match=r"describes another transcoder set"):
        export_circuit_tracer(models[2], tmp_path / "set", 4, feature_input_hook="ln2.hook_normalized",
                              feature_output_hook="hook_resid_post")
