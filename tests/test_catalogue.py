"""The catalogue of public SAEs: every release's layout, served from the loopback Hub under its real repo
name, folders and config keys (tiny tensors), loads by name with its LM, hook and the library's codes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

import sae_zoo
from sae_zoo.hub.catalogue import catalogue, list_pretrained, releases

D, N, K = 8, 32, 3


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    return {"W_dec": W_dec, "b_dec": 0.1 * torch.randn(D, generator=g), "W_enc": torch.randn(N, D, generator=g),
            "b_enc": 0.1 * torch.randn(N, generator=g), "threshold": 0.5 * torch.rand(N, generator=g)}


def topk(z: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, indices, values)


def saelens_files(w):   # jbloom/GPT2-Small-SAEs-Reformatted: SAELens < 6 flat cfg.json
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cuda", "model_name": "gpt2-small",
           "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8, "hook_head_index": None,
           "activation_fn_str": "relu", "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
           "context_size": 128, "dataset_path": "Skylion007/openwebtext", "normalize_activations": "none"}
    weights = {"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    codes = lambda x: F.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])  # noqa: E731
    return {"cfg.json": json.dumps(cfg).encode(), "sae_weights.safetensors": safetensors_bytes(weights)}, codes


def gemma_scope_files(w):   # google/gemma-scope-2b-pt-res: params.npz, no decoder bias subtracted
    buffer = io.BytesIO()
    np.savez(buffer, W_enc=w["W_enc"].T.numpy(), W_dec=w["W_dec"].numpy(), b_enc=w["b_enc"].numpy(),
             b_dec=w["b_dec"].numpy(), threshold=w["threshold"].numpy())
    z = lambda x: x @ w["W_enc"].T + w["b_enc"]  # noqa: E731
    return {"params.npz": buffer.getvalue()}, lambda x: F.relu(z(x)) * (z(x) > w["threshold"])


def sparsify_files(w):   # EleutherAI/sae-llama-3-8b-32x: sparsify's cfg.json and sae.safetensors
    cfg = {"expansion_factor": N // D, "normalize_decoder": True, "num_latents": 0, "k": K, "multi_topk": False,
           "d_in": D}
    weights = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    codes = lambda x: topk(F.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]), K)  # noqa: E731
    return {"cfg.json": json.dumps(cfg).encode(), "sae.safetensors": safetensors_bytes(weights)}, codes


def dictionary_learning_files(w, dict_class):   # canrager/lm_sae: SAEBench's dictionary_learning trainers
    state = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T.contiguous()}
    trainer = {"dict_class": dict_class, "activation_dim": D, "dict_size": N, "lr": 3e-4, "layer": 3,
               "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3", "device": "cuda:0"}
    if dict_class == "AutoEncoderTopK":
        state.update({"b_dec": w["b_dec"], "k": torch.tensor(K)})
        trainer.update({"trainer_class": "TopKTrainer", "k": K})
        codes = lambda x: topk(F.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]), K)  # noqa: E731
    else:  # AutoEncoder: decoder bias called "bias"; unit decoder rows, so its loader folds nothing
        state["bias"] = w["b_dec"]
        trainer["trainer_class"] = "StandardTrainer"
        codes = lambda x: F.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])  # noqa: E731
    buffer = io.BytesIO()
    torch.save(state, buffer)
    config = {"trainer": trainer, "buffer": {"d_submodule": D, "ctx_len": 128}}
    return {"ae.pt": buffer.getvalue(), "config.json": json.dumps(config).encode()}, codes


def sparsify_skip_transcoder_files(w):   # EleutherAI/skip-transcoder-SmolLM2-135M-128x: no b_dec subtracted
    cfg = {"expansion_factor": N // D, "normalize_decoder": True, "num_latents": 0, "k": K, "multi_topk": False,
           "skip_connection": True, "d_in": D}   # older sparsify: no 'transcode' key, a skip term
    weights = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
               "W_skip": w["W_skip"]}
    codes = lambda x: topk(F.relu(x @ w["W_enc"].T + w["b_enc"]), K)  # noqa: E731
    return {"cfg.json": json.dumps(cfg).encode(), "sae.safetensors": safetensors_bytes(weights)}, codes


def gemma_scope_2_files(w):   # google/gemma-scope-2-*: config.json and params.safetensors
    config = {"hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output", "width": N,
              "architecture": "jump_relu", "type": "transcoder", "affine_connection": True}
    params = {"w_enc": w["W_enc"].T.contiguous(), "w_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
              "threshold": w["threshold"], "affine_skip_connection": w["W_skip"].T.contiguous()}
    z = lambda x: x @ w["W_enc"].T + w["b_enc"]  # noqa: E731
    return ({"config.json": json.dumps(config).encode(), "params.safetensors": safetensors_bytes(params)},
            lambda x: F.relu(z(x)) * (z(x) > w["threshold"]))


LAYOUTS = {"saelens": saelens_files, "gemma_scope": gemma_scope_files, "sparsify": sparsify_files,
           "dictionary_learning": dictionary_learning_files}
#: transcoders' layouts: their output adds x @ W_skip.T
TRANSCODER_LAYOUTS = {"sparsify": sparsify_skip_transcoder_files, "gemma_scope_2": gemma_scope_2_files}


def circuit_tracer_clt_files(w, n_layers=3):   # mntss/clt-*: W_enc_N/W_dec_N at the repo's root, and config.yaml
    g = torch.Generator().manual_seed(11)
    files, layers = {"config.yaml": b"model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
                                    b"feature_output_hook: hook_mlp_out\n"}, []
    for i in range(n_layers):
        layer = {"W_enc": w["W_enc"] + i, "b_enc": w["b_enc"], "b_dec": w["b_dec"], "threshold": w["threshold"],
                 "W_dec": torch.randn(N, n_layers - i, D, generator=g)}
        files[f"W_enc_{i}.safetensors"] = safetensors_bytes({f"W_enc_{i}": layer["W_enc"], f"b_enc_{i}": w["b_enc"],
                                                             f"b_dec_{i}": w["b_dec"], f"threshold_{i}": w["threshold"]})
        files[f"W_dec_{i}.safetensors"] = safetensors_bytes({f"W_dec_{i}": layer["W_dec"]})
        layers.append(layer)
    return files, layers


def gemma_scope_2_clt_files(w, n_layers=3):   # google/gemma-scope-2-*: clt/.../params_layer_N.safetensors
    g = torch.Generator().manual_seed(12)
    files, layers = {}, []
    for i in range(n_layers):
        w_dec = torch.randn(N, n_layers, D, generator=g)
        layer = {"W_enc": w["W_enc"] - i, "b_enc": w["b_enc"], "b_dec": w["b_dec"], "threshold": w["threshold"],
                 "W_dec": w_dec[:, i:]}
        files[f"params_layer_{i}.safetensors"] = safetensors_bytes(
            {"w_enc": layer["W_enc"].T.contiguous(), "w_dec": w_dec, "b_enc": w["b_enc"], "b_dec": w["b_dec"],
             "threshold": w["threshold"]})
        layers.append(layer)
    return files, layers


CLT_LAYOUTS = {"circuit_tracer_clt": circuit_tracer_clt_files, "gemma_scope_2_clt": gemma_scope_2_clt_files}


def check_clt_release(entry, w, hub):
    files, layers = CLT_LAYOUTS[entry.format](w)
    prefix = f"{entry.path}/" if entry.path else ""
    hub.serve(entry.repo_id, {f"{prefix}{name}": data for name, data in files.items()})
    loaded = sae_zoo.load_sae(entry.name)
    assert loaded.format == entry.format and loaded.metadata["catalogue"] == entry.name
    assert loaded.clt.provenance["model_name"] == entry.model and loaded.clt.n_layers == len(layers)
    x = torch.randn(16, len(layers), D, generator=torch.Generator().manual_seed(1))
    codes = []
    for i, layer in enumerate(layers):
        z = x[:, i] @ layer["W_enc"].T + layer["b_enc"]
        codes.append(z * (z > layer["threshold"]))
    expected = torch.stack([sum(codes[i] @ layers[i]["W_dec"][:, out - i] for i in range(out + 1)) + layers[out]["b_dec"]
                            for out in range(len(layers))], 1)
    with torch.no_grad():
        out = loaded.model()(x)
    assert (out.codes != 0).any()
    torch.testing.assert_close(out.codes, torch.stack(codes, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.outputs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("release", releases())
def test_every_release_loads_by_name_with_its_lm_hook_and_codes(release, hub):
    entries = [e for e in catalogue().values() if e.release == release]
    entry = entries[len(entries) // 2]
    if entry.format in CLT_LAYOUTS:
        return check_clt_release(entry, tensors(len(entry.name)), hub)
    w = tensors(len(entry.name))
    w["W_skip"] = 0.3 * torch.randn(D, D, generator=torch.Generator().manual_seed(7))
    if entry.format == "dictionary_learning":
        dict_class = "AutoEncoderTopK" if "topk" in release else "AutoEncoder"
        files, codes = dictionary_learning_files(w, dict_class)
    else:
        files, codes = (TRANSCODER_LAYOUTS if entry.hook_out else LAYOUTS)[entry.format](w)
    # the repo holds its neighbour SAEs too, as the real ones do
    other = entries[0] if entries[0] != entry else entries[-1]
    hub.serve(entry.repo_id, {**{f"{entry.path}/{name}": data for name, data in files.items()},
                              **{f"{other.path}/{name}": data for name, data in files.items()}})

    sae = sae_zoo.load_sae(entry.name)
    assert sae.format == entry.format
    assert sae.metadata["model_name"] == entry.model and sae.metadata["hook_name"] == entry.hook
    assert sae.metadata["catalogue"] == entry.name and sae.metadata["subfolder"] == entry.path
    assert sae.dictionary.provenance["hook_name"] == entry.hook
    assert sae.transcoder == (entry.hook_out is not None) and sae.metadata.get("hook_name_out") == entry.hook_out
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    model = sae.model()
    torch.testing.assert_close(model.encode(x), codes(x), rtol=1e-5, atol=1e-5)
    assert (model.encode(x) != 0).any()
    skip = x @ w["W_skip"].T if sae.transcoder else 0
    torch.testing.assert_close(model(x).x_hat, codes(x) @ w["W_dec"] + w["b_dec"] + skip, rtol=1e-5, atol=1e-5)


def test_the_catalogue_lists_the_fields_public_saes():
    gemma = sae_zoo.list_pretrained("gemma-scope-2b*")
    assert gemma[0] == "gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_18" and len(gemma) == 30
    assert "gpt2-small-res-jb/blocks.11.hook_resid_post" in list_pretrained()
    assert len(list_pretrained("sae-llama-3-8b-32x/*")) == 32
    entry = catalogue()["sae-llama-3-8b-32x/layers.12"]
    assert (entry.repo_id, entry.path, entry.hook, entry.format) == (
        "EleutherAI/sae-llama-3-8b-32x", "layers.12", "model.layers.12", "sparsify")
    assert list_pretrained("nothing*") == []
    transcoders = list_pretrained("*transcoder*")
    assert len(list_pretrained("gemma-scope-2-270m-pt-transcoders-all/*")) == 18 * 8
    assert len(list_pretrained("skip-transcoder-SmolLM2-135M-128x/*")) == 30
    assert all(catalogue()[name].hook_out for name in transcoders) and len(transcoders) == 18 * 8 + 4 * 18 + 30
    smol = catalogue()["skip-transcoder-SmolLM2-135M-128x/model.layers.9.mlp"]
    assert (smol.repo_id, smol.path, smol.hook, smol.hook_out) == (
        "EleutherAI/skip-transcoder-SmolLM2-135M-128x", "model.layers.9.mlp", "model.layers.9.mlp.input",
        "model.layers.9.mlp")


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match=r"no SAE 'blocks.8.hook_resid_pr'.*close matches: blocks.8.hook_resid_pre"):
        sae_zoo.load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pr")
    with pytest.raises(FileNotFoundError, match=r"nor a catalogue entry; catalogue releases close to it: "
                                                r"gemma-scope-2b-pt-res"):
        sae_zoo.load_sae("gemma-scope-2b-pt-re/layer_12/width_16k/average_l0_82")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*close to it: gpt2-small-res-jb"):
        sae_zoo.load_sae("gpt2-small-res-j/blocks.8")   # looks like a Hub repo id, and is none
