"""Other libraries' SAEs as pretrained decoders: SAELens, sparsify and dictionary_learning checkpoints
written here as those libraries write them, and their encode/decode formulas computed independently."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.encoders import get_encoder_class, list_encoders
from sae_zoo.hub import export_saelens, load_sae

D_IN, D_SAE, K = 12, 40, 4
ATOL = 1e-5


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
            "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g) * (0.2 + torch.rand(D_SAE, 1, generator=g)),  # norms != 1
            "b_dec": torch.randn(D_IN, generator=g) * 0.5}


@pytest.fixture
def x():
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))


def unit_rows(w):
    return w / w.norm(dim=1, keepdim=True)


def topk_dense(values, k):
    top = values.topk(k, dim=-1)
    return torch.zeros_like(values).scatter(-1, top.indices, top.values)


def write_saelens(path: Path, tensors: dict, **cfg) -> Path:
    """As SAELens 6's ``SAE.save_model``: ``save_file(state_dict)`` and ``json.dump(cfg.to_dict())``."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    config = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
              "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"sae_lens_version": "6.5.0", "sae_lens_training_version": "6.5.0",
                           "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"},
              "architecture": "standard", **cfg}
    (path / "cfg.json").write_text(json.dumps(config))
    return path


# ---- SAELens ----

def saelens_standard(w, x, apply_b_dec=True):
    """SAELens StandardSAE: encode ReLU((x - b_dec) @ W_enc + b_enc); decode codes @ W_dec + b_dec."""
    codes = F.relu((x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"])
    return codes, codes @ w["W_dec"] + w["b_dec"]


def test_saelens_standard_unit_norm_decoder_gives_the_same_codes_and_reconstructions(tmp_path, weights, x):
    weights["W_dec"] = unit_rows(weights["W_dec"])
    sae = load_sae(write_saelens(tmp_path / "sae", weights))
    assert sae.format == "saelens" and sae.encoder.name == "linear" and sae.encoder.subtract_decoder_bias
    assert sae.metadata["hook_name"] == "blocks.8.hook_resid_pre" and sae.metadata["model_name"] == "gpt2"
    codes, x_hat = saelens_standard(weights, x)
    model = sae.model()
    with torch.no_grad():
        ours_hat, ours = model(x)
    torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, x_hat, atol=ATOL, rtol=1e-5)
    assert not model.dictionary.trainable and torch.equal(model.dictionary.bias, weights["b_dec"])


def test_saelens_standard_with_any_decoder_norms_gives_its_codes_exactly(tmp_path, weights, x):
    sae = load_sae(write_saelens(tmp_path / "sae", weights, apply_b_dec_to_input=False))
    assert not sae.encoder.subtract_decoder_bias
    codes, x_hat = saelens_standard(weights, x, apply_b_dec=False)
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)  # the source's values, not times the norms
    torch.testing.assert_close(ours_hat, x_hat, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(sae.dictionary.weight, unit_rows(weights["W_dec"]))  # unit directions ...
    torch.testing.assert_close(sae.dictionary.atom_norms, weights["W_dec"].norm(dim=1))  # ... and the norms kept
    torch.testing.assert_close(sae.dictionary.atoms, weights["W_dec"])


def test_saelens_topk_with_any_decoder_norms_and_its_rescaled_selection(tmp_path, weights, x):
    sae = load_sae(write_saelens(tmp_path / "topk", weights, architecture="topk", k=K))
    codes = topk_dense(F.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]), K)
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    assert sae.encoder.name == "topk" and sae.encoder.k == K
    torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, codes @ weights["W_dec"] + weights["b_dec"], atol=ATOL, rtol=1e-5)

    # rescale_acts_by_decoder_norm: SAELens selects on pre-activations times decoder norms and divides
    # the codes by the norms again when decoding
    sae = load_sae(write_saelens(tmp_path / "rescaled", weights, architecture="topk", k=K,
                                 rescale_acts_by_decoder_norm=True))
    norms = weights["W_dec"].norm(dim=1)
    codes = topk_dense(F.relu(((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]) * norms), K)
    x_hat = (codes / norms) @ weights["W_dec"] + weights["b_dec"]
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, x_hat, atol=ATOL, rtol=1e-5)
    assert sae.dictionary.atom_norms is None  # its codes are those of unit atoms


def saelens_jumprelu(w, x, apply_b_dec=False):
    """SAELens JumpReLUSAE: hidden_pre = (x - b_dec*apply) @ W_enc + b_enc; ReLU(hidden_pre) * (hidden_pre >
    threshold); decode codes @ W_dec + b_dec."""
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    codes = F.relu(pre) * (pre > w["threshold"])
    return codes, codes @ w["W_dec"] + w["b_dec"]


def thresholds():
    return torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) * 0.4


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_saelens_jumprelu_and_batchtopk_saved_for_inference(tmp_path, weights, x, apply_b_dec):
    """SAELens saves BatchTopK and Matryoshka SAEs for inference as ``jumprelu`` (one threshold on every latent)."""
    for name, threshold in {"jumprelu": thresholds(), "batchtopk": torch.full((D_SAE,), 0.15)}.items():
        tensors = dict(weights, threshold=threshold)
        sae = load_sae(write_saelens(tmp_path / name, tensors, architecture="jumprelu", apply_b_dec_to_input=apply_b_dec))
        assert sae.encoder.name == "jumprelu" and sae.encoder.subtract_decoder_bias == apply_b_dec
        codes, x_hat = saelens_jumprelu(tensors, x, apply_b_dec)
        assert 0 < (codes > 0).float().mean() < 0.9  # the thresholds do cut
        with torch.no_grad():
            ours_hat, ours = sae.model()(x)
        torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(ours_hat, x_hat, atol=ATOL, rtol=1e-5)


def test_saelens_gated(tmp_path, weights, x):
    g = torch.Generator().manual_seed(3)
    tensors = {k: v for k, v in weights.items() if k != "b_enc"}
    tensors.update(b_gate=torch.randn(D_SAE, generator=g) * 0.1, r_mag=torch.randn(D_SAE, generator=g) * 0.2,
                   b_mag=torch.randn(D_SAE, generator=g) * 0.1)
    sae = load_sae(write_saelens(tmp_path / "gated", tensors, architecture="gated"))
    assert sae.encoder.name == "gated"
    # SAELens GatedSAE.encode
    sae_in = x - tensors["b_dec"]
    active = (sae_in @ tensors["W_enc"] + tensors["b_gate"] > 0).float()
    codes = active * F.relu(sae_in @ (tensors["W_enc"] * tensors["r_mag"].exp()) + tensors["b_mag"])
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, codes @ tensors["W_dec"] + tensors["b_dec"], atol=ATOL, rtol=1e-5)


def test_saelens_before_version_6(tmp_path, weights, x):
    """SAELens < 6 wrote flat configs, ``hook_point`` and a top-k *activation* on a standard SAE."""
    weights["W_dec"] = unit_rows(weights["W_dec"])
    path = tmp_path / "old"
    path.mkdir()
    save_file(weights, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "model_name": "pythia-70m", "hook_point": "blocks.3.hook_resid_post",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": False}))
    sae = load_sae(path)
    assert sae.encoder.name == "topk" and sae.encoder.k == K
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    codes = topk_dense(F.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]), K)
    torch.testing.assert_close(sae.model().encode(x).detach(), codes, atol=ATOL, rtol=1e-5)


def test_an_encoder_without_a_matching_head_loads_its_decoder(tmp_path, weights, x):
    sae = load_sae(write_saelens(tmp_path / "abstopk", weights, architecture="abstopk", k=K))
    assert sae.encoder is None and "'abstopk'" in sae.encoder_unavailable
    torch.testing.assert_close(sae.dictionary.atoms, weights["W_dec"])
    with pytest.raises(ValueError, match="no sae_zoo head reproduces this saelens SAE's encoder"):
        sae.model()
    fista = create_encoder("fista", d_model=D_IN, n_latents=D_SAE, steps=30)
    x_hat, codes = sae.model(encoder=fista)(x)  # a better head on the pretrained decoder
    assert codes.shape == (64, D_SAE) and (codes >= 0).all()
    torch.testing.assert_close(x_hat, codes @ weights["W_dec"] + weights["b_dec"], atol=ATOL, rtol=1e-5)


def test_saelens_bad_input_is_named(tmp_path, weights):
    path = write_saelens(tmp_path / "sae", weights, d_sae=D_SAE + 1)
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: tensor 'W_dec' has shape \(40, 12\), "
                                         r"expected \(41, 12\) \(d_sae=41, d_in=12 in cfg.json\)"):
        load_sae(path)
    path = write_saelens(tmp_path / "noenc", {k: v for k, v in weights.items() if k != "W_enc"})
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: missing tensor 'W_enc'"):
        load_sae(path)
    (path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"cfg.json: expected a JSON object"):
        load_sae(path)
    path = write_saelens(tmp_path / "nothreshold", weights, architecture="jumprelu")
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: missing tensor 'threshold' \(a jumprelu SAE"):
        load_sae(path)
    path = write_saelens(tmp_path / "badthreshold", dict(weights, threshold=torch.ones(D_SAE - 1)), architecture="jumprelu")
    with pytest.raises(ValueError, match=r"tensor 'threshold' has shape \(39,\), expected \(40,\)"):
        load_sae(path)


@pytest.mark.parametrize("stop_on_duplicate_support", [True, False])
def test_saelens_matching_pursuit(tmp_path, weights, x, stop_on_duplicate_support):
    tensors = {"W_dec": unit_rows(weights["W_dec"]), "b_dec": weights["b_dec"]}  # tied: no W_enc
    cfg = {"architecture": "matching_pursuit", "max_iterations": 6, "residual_threshold": 0.5,
           "stop_on_duplicate_support": stop_on_duplicate_support, "apply_b_dec_to_input": True}
    sae = load_sae(write_saelens(tmp_path / "mp", tensors, **cfg))
    assert sae.encoder.name == "mp" and sae.encoder.k == 6
    codes = saelens_codes("matching_pursuit", tensors, cfg, x)
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, codes @ tensors["W_dec"] + tensors["b_dec"], atol=ATOL, rtol=1e-5)
    plain = load_sae(write_saelens(tmp_path / "norms", dict(tensors, W_dec=weights["W_dec"]), **cfg))
    assert plain.encoder is None and "not unit-norm" in plain.encoder_unavailable


# ---- sparsify ----

def write_sparsify(path: Path, tensors: dict, **cfg) -> Path:
    """As sparsify's ``SparseCoder.save_to_disk``: ``save_model(self)`` and ``{**cfg.to_dict(), "d_in"}``."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae.safetensors"))
    config = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE,
              "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, **cfg, "d_in": D_IN}
    (path / "cfg.json").write_text(json.dumps(config))
    return path


def test_sparsify_topk(tmp_path, weights, x):
    tensors = {"encoder.weight": weights["W_enc"].T, "encoder.bias": weights["b_enc"],
               "W_dec": unit_rows(weights["W_dec"]), "b_dec": weights["b_dec"]}
    sae = load_sae(write_sparsify(tmp_path / "layers.6", tensors))
    assert sae.format == "sparsify" and sae.encoder.name == "topk" and sae.metadata["hookpoint"] == "layers.6"
    # sparsify: top-k of ReLU(encoder(x - b_dec)); decode sum_j acts_j W_dec[idx_j] + b_dec
    pre = F.relu(F.linear(x - tensors["b_dec"], tensors["encoder.weight"], tensors["encoder.bias"]))
    acts, idx = pre.topk(K, dim=-1, sorted=False)
    x_hat = (acts[..., None] * tensors["W_dec"][idx]).sum(-2) + tensors["b_dec"]
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, torch.zeros_like(pre).scatter(-1, idx, acts), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, x_hat, atol=ATOL, rtol=1e-5)

    assert not sae.transcoder  # transcoders and skip-transcoders: tests/test_transcoder_formats.py
    assert load_sae(write_sparsify(tmp_path / "transcoder", tensors, transcode=True)).transcoder


# ---- dictionary_learning ----

def write_dictionary_learning(path: Path, state: dict, trainer: dict) -> Path:
    """As dictionary_learning's ``trainSAE``: ``t.save(ae.state_dict(), "ae.pt")`` and
    ``json.dump({"trainer": trainer.config, "buffer": ...}, "config.json")``."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D_IN, "ctx_len": 128}}))
    return path


def test_dictionary_learning_autoencoder(tmp_path, weights, x):
    # AutoEncoder: bias, encoder (Linear d->n), decoder (Linear n->d, no bias: weight (d, n), columns = atoms)
    state = {"bias": weights["b_dec"], "encoder.weight": weights["W_enc"].T.contiguous(),
             "encoder.bias": weights["b_enc"], "decoder.weight": weights["W_dec"].T.contiguous()}
    trainer = {"dict_class": "AutoEncoder", "trainer_class": "StandardTrainer", "activation_dim": D_IN,
               "dict_size": D_SAE, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3,
               "submodule_name": "resid_post_layer_3"}
    sae = load_sae(write_dictionary_learning(tmp_path / "ae", state, trainer))
    assert sae.format == "dictionary_learning" and sae.encoder.name == "linear"
    assert sae.metadata["model_name"] == "EleutherAI/pythia-70m-deduped"
    # dictionary_learning: encode ReLU(encoder(x - bias)); decode decoder(f) + bias
    f = F.relu(F.linear(x - state["bias"], state["encoder.weight"], state["encoder.bias"]))
    x_hat = F.linear(f, state["decoder.weight"]) + state["bias"]
    norms = state["decoder.weight"].norm(dim=0)  # its own from_pretrained normalises the decoder into the codes
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, f * norms, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, x_hat, atol=ATOL, rtol=1e-5)


def test_dictionary_learning_topk_and_other_classes(tmp_path, weights, x):
    decoder = unit_rows(weights["W_dec"]).T.contiguous()
    state = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(-1.0), "decoder.weight": decoder,
             "encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
             "b_dec": weights["b_dec"]}
    sae = load_sae(write_dictionary_learning(tmp_path / "topk", state, {"dict_class": "AutoEncoderTopK", "k": K}))
    f = topk_dense(F.relu(F.linear(x - state["b_dec"], state["encoder.weight"], state["encoder.bias"])), K)
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, f, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, F.linear(f, decoder) + state["b_dec"], atol=ATOL, rtol=1e-5)

    with pytest.raises(ValueError, match=r"config.json: missing key 'trainer.dict_class'"):
        load_sae(write_dictionary_learning(tmp_path / "noclass", state, {"k": K}))
    (tmp_path / "topk" / "ae.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"ae.pt: not a readable torch state dict"):
        load_sae(tmp_path / "topk")
    with pytest.raises(ValueError, match=r"config.json: trainer.dict_class 'CrossCoder' is not a dictionary_learning "
                                         r"class sae_zoo reads \(known: AutoEncoder, AutoEncoderTopK, BatchTopKSAE"):
        load_sae(write_dictionary_learning(tmp_path / "crosscoder", state, {"dict_class": "CrossCoder"}))


@pytest.mark.parametrize("threshold", [-1.0, 0.2])
def test_dictionary_learning_batchtopk_and_matryoshka(tmp_path, weights, x, threshold):
    """BatchTopKSAE (encoder/decoder Linears) and MatryoshkaBatchTopKSAE (W_enc/W_dec parameters) encode with
    their threshold at inference: ReLU(pre) * (ReLU(pre) > threshold), pre = (x - b_dec) W_enc + b_enc;
    a threshold of -1 (never updated) keeps every positive value."""
    common = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold), "b_dec": weights["b_dec"]}
    batch = {**common, "encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
             "decoder.weight": weights["W_dec"].T.contiguous()}
    matryoshka = {**common, "group_sizes": torch.tensor([10, 30]), "W_enc": weights["W_enc"], "b_enc": weights["b_enc"],
                  "W_dec": weights["W_dec"]}
    post = F.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    codes = post * (post > threshold)
    for name, state in {"BatchTopKSAE": batch, "MatryoshkaBatchTopKSAE": matryoshka}.items():
        sae = load_sae(write_dictionary_learning(tmp_path / name, state, {"dict_class": name, "k": K}))
        assert sae.encoder.name == "batchtopk" and sae.encoder.k == K
        with torch.no_grad():
            ours_hat, ours = sae.model()(x)
        torch.testing.assert_close(ours, codes, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(ours_hat, codes @ weights["W_dec"] + weights["b_dec"], atol=ATOL, rtol=1e-5)
    assert sae.metadata["group_sizes"] == [10, 30]


def test_dictionary_learning_jumprelu_and_gated(tmp_path, weights, x):
    jump = {"W_enc": weights["W_enc"], "b_enc": weights["b_enc"], "W_dec": weights["W_dec"],
            "b_dec": weights["b_dec"], "threshold": thresholds()}
    sae = load_sae(write_dictionary_learning(tmp_path / "jump", jump, {"dict_class": "JumpReluAutoEncoder"}))
    pre = x @ jump["W_enc"] + jump["b_enc"]  # apply_b_dec_to_input is False
    f = F.relu(pre * (pre > jump["threshold"]))
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, f, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, f @ jump["W_dec"] + jump["b_dec"], atol=ATOL, rtol=1e-5)

    g = torch.Generator().manual_seed(4)
    gated = {"decoder_bias": weights["b_dec"], "encoder.weight": weights["W_enc"].T.contiguous(),
             "r_mag": torch.randn(D_SAE, generator=g) * 0.2, "gate_bias": torch.randn(D_SAE, generator=g) * 0.1,
             "mag_bias": torch.randn(D_SAE, generator=g) * 0.1, "decoder.weight": weights["W_dec"].T.contiguous()}
    sae = load_sae(write_dictionary_learning(tmp_path / "gated", gated, {"dict_class": "GatedAutoEncoder"}))
    x_enc = F.linear(x - gated["decoder_bias"], gated["encoder.weight"])
    f = (x_enc + gated["gate_bias"] > 0) * F.relu(gated["r_mag"].exp() * x_enc + gated["mag_bias"])
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, f, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, F.linear(f, gated["decoder.weight"]) + gated["decoder_bias"], atol=ATOL,
                               rtol=1e-5)


# ---- Gemma Scope ----

def write_gemma_scope(path: Path, arrays: dict) -> Path:
    """As Gemma Scope's repos hold them: ``np.savez(params.npz, **params)``, W_enc (d, n) and W_dec (n, d)."""
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "params.npz", **{k: v.numpy() for k, v in arrays.items()})
    return path


def test_gemma_scope_params_npz(tmp_path, weights, x):
    arrays = dict(weights, threshold=thresholds())
    sae = load_sae(write_gemma_scope(tmp_path / "layer_20" / "width_16k" / "average_l0_71", arrays))
    assert sae.format == "gemma_scope" and sae.encoder.name == "jumprelu" and sae.metadata["layer"] == 20
    # Gemma Scope's JumpReLUSAE: pre = x @ W_enc + b_enc; acts = (pre > threshold) * ReLU(pre); acts @ W_dec + b_dec
    pre = x @ arrays["W_enc"] + arrays["b_enc"]
    acts = (pre > arrays["threshold"]) * F.relu(pre)
    with torch.no_grad():
        ours_hat, ours = sae.model()(x)
    torch.testing.assert_close(ours, acts, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_hat, acts @ arrays["W_dec"] + arrays["b_dec"], atol=ATOL, rtol=1e-5)

    with pytest.raises(ValueError, match=r"params.npz: missing array 'threshold'"):
        load_sae(write_gemma_scope(tmp_path / "missing", weights))
    with pytest.raises(ValueError, match=r"params.npz: tensor 'b_enc' has shape \(39,\), expected \(40,\)"):
        load_sae(write_gemma_scope(tmp_path / "misshaped", dict(arrays, b_enc=torch.zeros(D_SAE - 1))))
    (tmp_path / "missing" / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"params.npz: not a readable .npz archive"):
        load_sae(tmp_path / "missing")


# ---- export to SAELens, format detection, the Hub ----

def saelens_codes(architecture: str, w: dict, cfg: dict, x):
    """What SAELens computes from an exported cfg.json and weights, architecture by architecture."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    if architecture == "matching_pursuit":  # SAELens's _encode_matching_pursuit, sample by sample
        codes = torch.zeros(len(x), w["W_dec"].shape[0])
        for i, residual in enumerate(sae_in.clone()):
            for _ in range(cfg["max_iterations"]):
                before = codes[i] != 0
                j = int((w["W_dec"] @ residual).relu().argmax())
                value = (residual @ w["W_dec"][j]).relu()
                codes[i, j] += value
                residual = residual - value * w["W_dec"][j]
                if (cfg["stop_on_duplicate_support"] and torch.equal(codes[i] != 0, before)) or \
                        (cfg["residual_threshold"] > 0 and residual.norm() < cfg["residual_threshold"]):
                    break
        return codes
    if architecture == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        return active * F.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if architecture == "jumprelu":
        return F.relu(pre) * (pre > w["threshold"])
    if architecture == "topk":
        assert not cfg["rescale_acts_by_decoder_norm"]
        return topk_dense(pre, cfg["k"]).relu()
    assert architecture == "standard"
    return F.relu(pre)


EXPORTABLE = [name for name in list_encoders() if get_encoder_class(name).architectures]


@pytest.mark.parametrize("name", EXPORTABLE)
@pytest.mark.parametrize("norms", ["unit", "kept", "learned"])
def test_export_to_saelens_round_trips_and_matches_saelens_formulas(tmp_path, name, norms, x):
    """Every head that names an architecture exports, with unit atoms, kept or learned decoder norms, to files
    whose SAELens codes and reconstructions are the model's (learned norms: SAELens's free-norm SAEs,
    ``rescale_acts_by_decoder_norm: false``)."""
    torch.manual_seed(0)
    iterative = name == "mp"  # iterative heads always work on x - b_dec
    head = create_encoder(name, d_model=D_IN, n_latents=D_SAE, **{**get_encoder_class(name).example_kwargs,
                                                                  **({} if iterative else {"subtract_decoder_bias": True})})
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # biases, thresholds and r_mag away from their init
        if name == "batchtopk":
            head.threshold.fill_(0.05)
    atoms = torch.randn(D_SAE, D_IN) * (1 if norms == "unit" else 0.3 + torch.rand(D_SAE, 1))
    keep = {"unit": False, "kept": True, "learned": "learned"}[norms]
    dictionary = Dictionary.from_tensor(atoms, bias=torch.randn(D_IN), keep_norms=keep, trainable=norms == "learned")
    model = SparseCoder(head, dictionary).eval()
    if name == "mp" and norms != "unit":  # SAELens's matching pursuit takes r . w as a code: unit rows only
        with pytest.raises(ValueError, match="its rows must be unit-norm"):
            export_saelens(model, tmp_path / "exported")
        return
    out = export_saelens(model, tmp_path / "exported", hook_name="blocks.0.hook_resid_post", model_name="gpt2")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] in ("standard", "topk", "jumprelu", "gated", "matching_pursuit")
    assert cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["metadata"]["sae_zoo_encoder"] == name
    w = load_file(str(out / "sae_weights.safetensors"))
    codes = saelens_codes(cfg["architecture"], w, cfg, x)
    with torch.no_grad():
        ours_hat, ours = model(x)
        back_hat, back = load_sae(out).model()(x)
    assert 0 < (codes > 0).float().mean() < 1
    torch.testing.assert_close(codes, ours, atol=ATOL, rtol=1e-5)  # what SAELens computes from the export
    torch.testing.assert_close(codes @ w["W_dec"] + w["b_dec"], ours_hat, atol=ATOL, rtol=1e-5)
    # reading it back: the atoms are renormalised on load, which moves them by float32 rounding only
    torch.testing.assert_close(back, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back_hat, ours_hat, atol=1e-5, rtol=1e-5)


def test_batchtopk_threshold_on_contributions_exports_as_a_threshold_per_latent(tmp_path, x):
    """``threshold_on="contribution"``: a latent fires when its code times its atom's norm passes the threshold;
    SAELens gets that as a JumpReLU threshold per latent (the threshold over the norm), with the same codes."""
    torch.manual_seed(0)
    head = create_encoder("batchtopk", d_model=D_IN, n_latents=D_SAE, k=K, subtract_decoder_bias=True,
                          threshold_on="contribution")
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        head.threshold.fill_(0.1)
    atoms = torch.randn(D_SAE, D_IN) * (0.3 + torch.rand(D_SAE, 1))
    model = SparseCoder(head, Dictionary.from_tensor(atoms, bias=torch.randn(D_IN), keep_norms="learned",
                                                     trainable=True)).eval()
    with torch.no_grad():
        ours = model.encode(x)
        acts = head.linear_map(x, model.dictionary).relu()
    norms = model.dictionary.atom_norms.detach()
    torch.testing.assert_close(ours, acts * (acts * norms > 0.1))
    assert not torch.equal(ours > 0, acts > 0.1)  # not the threshold on the codes
    out = export_saelens(model, tmp_path / "exported")
    cfg, w = json.loads((out / "cfg.json").read_text()), load_file(str(out / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu"
    torch.testing.assert_close(w["threshold"], 0.1 / norms)
    torch.testing.assert_close(saelens_codes("jumprelu", w, cfg, x), ours, atol=ATOL, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load_sae(out).model().encode(x), ours, atol=1e-5, rtol=1e-5)


def test_export_of_a_head_saelens_lacks(tmp_path):
    model = SparseCoder(create_encoder("mlp", d_model=D_IN, n_latents=D_SAE, hidden=8), Dictionary(D_SAE, D_IN))
    with pytest.raises(ValueError, match="SAELens has no encoder like sae_zoo's 'mlp' head"):
        export_saelens(model, tmp_path / "mlp")
    assert not (tmp_path / "mlp").exists()
    out = export_saelens(model, tmp_path / "mlp", decoder_only=True)
    sae = load_sae(out)
    torch.testing.assert_close(sae.dictionary.atoms, model.dictionary.atoms)
    assert json.loads((out / "cfg.json").read_text())["metadata"]["sae_zoo_encoder"] == "tied (decoder only)"


def test_format_detection(tmp_path, weights):
    with pytest.raises(ValueError, match=r"holds no known SAE format \(files: none\)"):
        load_sae(tmp_path)
    path = write_saelens(tmp_path / "both", weights)
    save_file({"W_dec": weights["W_dec"]}, str(path / "sae.safetensors"))
    with pytest.raises(ValueError, match="matches several formats"):
        load_sae(path)
    assert load_sae(path, format="saelens").format == "saelens"
    with pytest.raises(ValueError, match="format='sae_lens' is not one of"):
        load_sae(path, format="sae_lens")


def test_load_an_sae_from_a_hub_repo_subfolder(tmp_path, hub, weights, x):
    weights["W_dec"] = unit_rows(weights["W_dec"])
    api = HfApi()
    api.create_repo("frank/gpt2-saes")
    api.upload_folder(repo_id="frank/gpt2-saes", folder_path=write_saelens(tmp_path / "sae", weights),
                      path_in_repo="blocks.8.hook_resid_pre")
    sae = load_sae("frank/gpt2-saes", subfolder="blocks.8.hook_resid_pre")
    codes, _ = saelens_standard(weights, x)
    torch.testing.assert_close(sae.model().encode(x).detach(), codes, atol=ATOL, rtol=1e-5)
    assert sae.metadata["source"] == "frank/gpt2-saes" and sae.metadata["subfolder"] == "blocks.8.hook_resid_pre"
    with pytest.raises(ValueError, match="holds no known SAE format"):
        load_sae("frank/gpt2-saes")  # the SAE lives in a subfolder


def test_fista_warm_started_by_a_pretrained_saes_own_encoder(tmp_path, weights, x):
    """The paper's SAE+inference on someone else's SAE: FISTA against its decoder, seeded by its encoder."""
    sae = load_sae(write_saelens(tmp_path / "sae", weights))
    fista = create_encoder("fista", d_model=D_IN, n_latents=D_SAE, l1_coeff=0.01, steps=300, warm_start=sae.encoder)
    plain, refined = sae.model().eval(), sae.model(encoder=fista).eval()

    def objective(model):
        with torch.no_grad():
            x_hat, codes = model(x)
        return ((x_hat - x).square().mean(-1) + 0.01 * codes.abs().mean(-1)).mean()

    assert objective(refined) < 0.9 * objective(plain)
    refined.save_pretrained(tmp_path / "refined")
    reloaded = SparseCoder.from_pretrained(tmp_path / "refined")
    assert reloaded.encoder.config()["warm_start"]["subtract_decoder_bias"] is True
    assert torch.equal(reloaded.encode(x), refined.encode(x))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_of_a_normalised_run_gives_its_codes_on_raw_activations(tmp_path, name, x):
    """A run trained on activations scaled by ``input_scale`` (``data.normalize: true``) exports the scale folded
    into its weights: SAELens's formulas on raw activations give the model's codes of the scaled ones, and its
    reconstruction over the scale."""
    torch.manual_seed(0)
    scale = 2.5
    iterative = name == "mp"
    head = create_encoder(name, d_model=D_IN, n_latents=D_SAE, **{**get_encoder_class(name).example_kwargs,
                                                                  **({} if iterative else {"subtract_decoder_bias": True})})
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        if name == "batchtopk":
            head.threshold.fill_(0.05)
    dictionary = Dictionary.from_tensor(torch.randn(D_SAE, D_IN) * (0.3 + torch.rand(D_SAE, 1)), bias=torch.randn(D_IN),
                                        keep_norms=not iterative and "learned", trainable=True)  # mp: unit rows
    dictionary.provenance = {"input_scale": scale}
    model = SparseCoder(head, dictionary).eval()
    if iterative:
        with pytest.raises(ValueError, match="scaled by 2.5 .* no export gives this model's codes on raw activations"):
            export_saelens(model, tmp_path / "exported")
        return
    out = export_saelens(model, tmp_path / "exported")
    cfg, w = json.loads((out / "cfg.json").read_text()), load_file(str(out / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_zoo_input_scale_folded"] == scale
    raw = x / scale  # what the model saw, before the run's normalisation
    codes = saelens_codes(cfg["architecture"], w, cfg, raw)
    with torch.no_grad():
        ours_hat, ours = model(x)
    assert 0 < (codes > 0).float().mean() < 1
    torch.testing.assert_close(codes, ours, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(codes @ w["W_dec"] + w["b_dec"], ours_hat / scale, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "jumprelu", "gated"])
def test_saelens_loads_the_export_of_a_normalised_run_with_its_codes(tmp_path, name, x):
    """SAELens's own loader and encoder, on raw activations, against the model on the scaled ones."""
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    head = create_encoder(name, d_model=D_IN, n_latents=D_SAE, subtract_decoder_bias=True,
                          **get_encoder_class(name).example_kwargs)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    dictionary = Dictionary.from_tensor(torch.randn(D_SAE, D_IN), bias=torch.randn(D_IN), keep_norms="learned",
                                        trainable=True)
    dictionary.provenance = {"input_scale": 0.4}
    model = SparseCoder(head, dictionary).eval()
    sae = sae_lens.SAE.load_from_disk(export_saelens(model, tmp_path / "exported"), device="cpu")
    with torch.no_grad():
        ours_hat, ours = model(x)
        codes = sae.encode(x / 0.4)
        torch.testing.assert_close(codes, ours, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(sae.decode(codes), ours_hat / 0.4, atol=ATOL, rtol=1e-5)
    assert 0 < (codes > 0).float().mean() < 1
