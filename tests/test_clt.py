"""Cross-layer transcoders: the model against its formula and a per-layer transcoder, training, circuit-tracer's and
Gemma Scope 2's files (written by circuit-tracer's own code where it has any), export, and bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sae_zoo
from sae_zoo import CrossLayerTranscoder, SparseCoder, create_encoder
from sae_zoo.clt import CrossLayerDecoder, check_layers
from sae_zoo.data.base import Pair
from sae_zoo.dictionary import Dictionary
from sae_zoo.families import create_family
from sae_zoo.hub import export_circuit_tracer, export_circuit_tracer_clt

N_LAYERS, D, D_TC = 3, 8, 16


def randomised(clt: CrossLayerTranscoder, seed: int = 0, threshold: float = 0.3) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for head in clt.encoders:
            if hasattr(head, "threshold"):
                head.threshold.copy_(threshold * torch.rand(head.threshold.shape, generator=g))
    return clt.eval()


def formula(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's equations, term by term: codes per layer, then sum_{i <= L} codes_i @ W_dec_i[:, L - i]."""
    codes = []
    for i, head in enumerate(clt.encoders):
        z = x[:, i] @ head.linear.weight.T + head.linear.bias
        codes.append(F.relu(z) * (z > head.threshold) if hasattr(head, "threshold") else F.relu(z))
    outs = []
    for layer in range(clt.n_layers):
        out = clt.decoder.b_dec[layer].clone()
        for i in range(layer + 1):
            out = out + codes[i] @ clt.decoder.W_dec[i][:, layer - i]
        if clt.W_skip is not None:
            out = out + x[:, layer] @ clt.W_skip[layer]
        outs.append(out)
    return torch.stack(outs, 1), torch.stack(codes, 1)


@pytest.mark.parametrize("head,skip", [("jumprelu", False), ("linear", True)])
def test_the_clt_computes_its_formula_densely_and_sparsely(head, skip):
    clt = randomised(CrossLayerTranscoder.create(N_LAYERS, D, D_TC, head, skip_connection=skip), threshold=1.5)
    x = torch.randn(64, N_LAYERS, D, generator=torch.Generator().manual_seed(1))
    expected, codes = formula(clt, x)
    with torch.no_grad():
        out = clt(x)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.outputs, expected, rtol=1e-5, atol=1e-5)
    assert out.outputs.shape == (64, N_LAYERS, D) and out.codes.shape == (64, N_LAYERS, D_TC)
    # with grad enabled the decode is dense; without, sparse codes gather their decoders: the same outputs
    dense = clt.decode(codes.clone().requires_grad_(), x)
    torch.testing.assert_close(dense.detach(), expected, rtol=1e-5, atol=1e-5)
    sparse = torch.zeros_like(codes)
    sparse[:, :, :1] = codes[:, :, :1]  # below the sparse-decode share
    with torch.no_grad():
        torch.testing.assert_close(clt.decode(sparse, x), formula_decode(clt, sparse, x), rtol=1e-5, atol=1e-5)


def formula_decode(clt, codes, x):
    out = clt.decoder.b_dec.expand(len(codes), -1, -1).clone()
    for layer in range(clt.n_layers):
        for i in range(layer + 1):
            out[:, layer] += codes[:, i] @ clt.decoder.W_dec[i][:, layer - i]
    return out + (torch.einsum("bld,lde->ble", x, clt.W_skip) if clt.W_skip is not None else 0)


@pytest.mark.parametrize("head", ["jumprelu", "topk"])
def test_a_one_layer_clt_is_a_per_layer_transcoder(head):
    kwargs = {"k": 3} if head == "topk" else {}
    clt = randomised(CrossLayerTranscoder.create(1, D, D_TC, {"name": head, **kwargs}, skip_connection=True))
    encoder = create_encoder(head, d_model=D, n_latents=D_TC, **kwargs)
    encoder.load_state_dict(clt.encoders[0].state_dict())
    dictionary = Dictionary.from_tensor(clt.decoder.W_dec[0][:, 0].detach(), bias=clt.decoder.b_dec[0].detach(),
                                        keep_norms=True)
    tc = SparseCoder(encoder, dictionary, family=create_family("transcoder", skip_connection=True)).eval()
    with torch.no_grad():
        tc.skip.weight.copy_(clt.W_skip[0].T)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = clt(x[:, None]), tc(x)
    torch.testing.assert_close(out.codes[:, 0], ref.codes)
    torch.testing.assert_close(out.outputs[:, 0], ref.x_hat, rtol=1e-5, atol=1e-5)


def synthetic_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets written by sparse features, each read at one layer and writing that layer and the next."""
    g = torch.Generator().manual_seed(seed)
    enc = F.normalize(torch.randn(N_LAYERS, 12, D, generator=g), dim=-1)
    dec = torch.randn(N_LAYERS, 12, N_LAYERS, D, generator=g)
    codes = torch.rand(n, N_LAYERS, 12, generator=g) * (torch.rand(n, N_LAYERS, 12, generator=g) < 0.15)
    x = torch.einsum("blf,lfd->bld", codes, enc) + 0.01 * torch.randn(n, N_LAYERS, D, generator=g)
    target = torch.zeros(n, N_LAYERS, D)
    for i in range(N_LAYERS):
        for layer in range(i, N_LAYERS):
            target[:, layer] += codes[:, i] @ dec[i, :, layer]
    return x, target


@pytest.mark.parametrize("head,options", [("jumprelu", {"target_l0": 6.0, "sparsity_coeff": 1e-3}),
                                          ("topk", {"auxk_coeff": 0.03, "dead_tokens": 64, "lr_decay_steps": 0.2})])
def test_training_lowers_the_summed_reconstruction_loss(head, options):
    torch.manual_seed(0)
    x, target = synthetic_pairs(4096)
    spec = {"name": head, **({"k": 4} if head == "topk" else {"threshold_init": 0.01})}
    clt = CrossLayerTranscoder.create(N_LAYERS, D, D_TC, spec, lr=1e-2, **options)
    with torch.no_grad():
        before = float(clt.loss_terms(x[:512], target[:512])["mse"])
    loader = torch.utils.data.DataLoader(list(zip(x.split(128), target.split(128))), batch_size=None)
    trainer = L.Trainer(max_steps=80, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(clt, loader)
    clt.eval()
    with torch.no_grad():
        terms = clt.loss_terms(x[:512], target[:512])
    assert float(terms["mse"]) < 0.5 * before
    if head == "topk":
        assert float(terms["l0"]) == pytest.approx(4 * N_LAYERS)
    else:  # the controller moved the penalty from where it started, towards the summed L0 asked for
        assert float(clt.sparsity.coeff) != pytest.approx(1e-3)


def test_the_sparsity_penalty_is_anthropics_tanh_of_codes_times_summed_decoder_norms():
    clt = randomised(CrossLayerTranscoder.create(N_LAYERS, D, D_TC, "jumprelu", sparsity_coeff=0.5, tanh_scale=2.0))
    clt.train()
    x, target = synthetic_pairs(16)
    terms = clt.loss_terms(x, target)
    codes = clt.encode(x).detach()
    norms = torch.stack([sum(w[:, j].norm(dim=-1) for j in range(w.shape[1])) for w in clt.decoder.W_dec])
    expected = 0.5 * torch.tanh(2.0 * codes * norms).sum() / len(x)
    torch.testing.assert_close(terms["sparsity"], expected, rtol=1e-5, atol=1e-6)


def circuit_tracer_clt(activation: str, seed: int = 0):
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    model = ct.CrossLayerTranscoder(N_LAYERS, D_TC, D, activation_function=activation, lazy_decoder=False,
                                    device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g))
        if activation == "jump_relu":
            model.activation_function.threshold.copy_(0.5 * torch.rand(N_LAYERS, 1, D_TC, generator=g))
    return ct, model


@pytest.mark.parametrize("activation", ["jump_relu", "relu"])
def test_circuit_tracer_clt_folders_load_with_its_features_and_outputs(tmp_path, activation):
    ct, theirs = circuit_tracer_clt(activation)
    theirs.to_safetensors(str(tmp_path / "clt"))  # circuit-tracer's own writer
    loaded = sae_zoo.load_sae(tmp_path / "clt")
    assert loaded.format == "circuit_tracer_clt" and loaded.metadata["architecture"] == {"jump_relu": "clt_jumprelu",
                                                                                     "relu": "clt_linear"}[activation]
    ours = loaded.model()
    x = torch.randn(N_LAYERS, 40, D, generator=torch.Generator().manual_seed(3))  # circuit-tracer: (layers, pos, d)
    with torch.no_grad():
        features = theirs.encode(x)
        outputs = theirs.decode(features.to_sparse())
        out = ours(x.transpose(0, 1))
    assert (features != 0).float().mean() > 0.1
    torch.testing.assert_close(out.codes, features.transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.outputs, outputs.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_a_trained_clt_exports_to_circuit_tracer_and_its_load_clt_reads_the_same_outputs(tmp_path):
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    clt = randomised(CrossLayerTranscoder.create(N_LAYERS, D, D_TC, "jumprelu", layers=[4, 5, 6]))
    clt.provenance.update(input_scales=[2.0, 0.5, 1.5], target_scales=[3.0, 1.0, 0.25])
    export_circuit_tracer(clt, tmp_path / "out", feature_input_hook="ln2.hook_normalized")  # the name
    theirs = ct.load_clt(str(tmp_path / "out"), feature_input_hook="ln2.hook_normalized", lazy_decoder=False,
                         device=torch.device("cpu"), dtype=torch.float32)
    raw = torch.randn(30, N_LAYERS, D, generator=torch.Generator().manual_seed(4))
    scales, target_scales = torch.tensor([2.0, 0.5, 1.5]), torch.tensor([3.0, 1.0, 0.25])
    with torch.no_grad():
        out = clt(raw * scales[:, None])  # the CLT reads scaled inputs and writes scaled targets
        features = theirs.encode(raw.transpose(0, 1))
        outputs = theirs.decode(features.to_sparse())
    torch.testing.assert_close(features.transpose(0, 1), out.codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs.transpose(0, 1), out.outputs / target_scales[:, None], rtol=1e-5, atol=1e-5)
    reloaded = sae_zoo.load_sae(tmp_path / "out")  # and sae_zoo reads its own export back
    assert reloaded.metadata["hook_name"] == "ln2.hook_normalized"
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model()(raw).outputs, outputs.transpose(0, 1), rtol=1e-5, atol=1e-5)


def gemma_scope_2_clt_files(folder, n_layers=N_LAYERS, skip=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    layers = []
    for i in range(n_layers):
        t = {"w_enc": torch.randn(D, D_TC, generator=g), "w_dec": 0.3 * torch.randn(D_TC, n_layers, D, generator=g),
             "b_enc": 0.1 * torch.randn(D_TC, generator=g), "b_dec": 0.1 * torch.randn(D, generator=g),
             "threshold": 0.5 * torch.rand(D_TC, generator=g)}
        if skip:
            t["affine_skip_connection"] = 0.2 * torch.randn(D, D, generator=g)
        save_file(t, str(folder / f"params_layer_{i}.safetensors"))
        layers.append(t)
    return layers


def test_gemma_scope_2_clt_files_load_as_googles_code_computes_them(tmp_path):
    layers = gemma_scope_2_clt_files(tmp_path / "clt")
    x = torch.randn(20, N_LAYERS, D, generator=torch.Generator().manual_seed(6))
    codes = []
    for i, t in enumerate(layers):
        z = x[:, i] @ t["w_enc"] + t["b_enc"]
        codes.append(F.relu(z) * (z > t["threshold"]))
    expected = torch.stack([sum(codes[i] @ layers[i]["w_dec"][:, layer] for i in range(layer + 1))
                            + layers[layer]["b_dec"] + x[:, layer] @ layers[layer]["affine_skip_connection"]
                            for layer in range(N_LAYERS)], 1)
    loaded = sae_zoo.load_sae(tmp_path / "clt")
    assert loaded.format == "gemma_scope_2_clt" and loaded.clt.n_layers == N_LAYERS
    with torch.no_grad():
        out = loaded.model()(x)
    torch.testing.assert_close(out.codes, torch.stack(codes, 1))
    torch.testing.assert_close(out.outputs, expected, rtol=1e-5, atol=1e-5)
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    # circuit-tracer's loader walks range(max(paths)), leaving the last file out: given one key beyond, it reads all
    paths = {i: str(tmp_path / "clt" / f"params_layer_{i}.safetensors") for i in range(N_LAYERS)}
    theirs = ct.load_gemma_scope_2_clt({**paths, N_LAYERS: None}, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        features = theirs.encode(x.transpose(0, 1))
        outputs = theirs.decode(features.to_sparse(), input_acts=x.transpose(0, 1))
    torch.testing.assert_close(outputs.transpose(0, 1), out.outputs, rtol=1e-5, atol=1e-5)


def test_saved_clts_load_back_through_load_sae(tmp_path):
    clt = randomised(CrossLayerTranscoder.create(N_LAYERS, D, D_TC, {"name": "topk", "k": 2}, skip_connection=True,
                                                 layers=[2, 3, 4]))
    clt.save_pretrained(tmp_path / "saved")
    loaded = sae_zoo.load_sae(tmp_path / "saved")
    assert loaded.format == "sae_zoo" and loaded.clt.layers == [2, 3, 4]
    x = torch.randn(10, N_LAYERS, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model()(x).outputs, clt(x).outputs)


def test_a_clt_goes_to_the_hub_and_comes_back_with_its_outputs(hub):
    clt = randomised(CrossLayerTranscoder.create(N_LAYERS, D, D_TC, "jumprelu", layers=[3, 4, 5]))
    clt.push_to_hub("alice/clt-test")  # the Hub mixin's own push: config.json, model.safetensors, a card
    files = hub.repos["alice/clt-test"].resolve("main")[1]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert b"cross-layer transcoder over blocks 3-5" in files["README.md"] and b"library_name: sae_zoo" in files["README.md"]
    x = torch.randn(12, N_LAYERS, D)
    for loaded in (CrossLayerTranscoder.from_pretrained("alice/clt-test"), sae_zoo.load_sae("alice/clt-test").model()):
        assert loaded.layers == [3, 4, 5]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).outputs, clt(x).outputs)


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"layers: \[6, 8, 9\] are not consecutive"):
        check_layers([6, 8, 9])
    with pytest.raises(ValueError, match=r"asks for block 31, and the model has blocks 0..29"):
        check_layers([29, 30, 31], n_model_layers=30)
    with pytest.raises(ValueError, match=r"encoder 'fista' \(layer 0\) is iterative"):
        CrossLayerTranscoder.create(2, D, D_TC, {"name": "fista", "steps": 2})
    with pytest.raises(ValueError, match=r"target_l0=8.*fixes its L0"):
        CrossLayerTranscoder.create(2, D, D_TC, {"name": "topk", "k": 2}, target_l0=8.0)
    clt = CrossLayerTranscoder.create(2, D, D_TC)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 2, 8\), got \(4, 3, 8\)"):
        clt(torch.randn(4, 3, D))
    with pytest.raises(ValueError, match="build it with sae_zoo.CrossLayerTranscoder"):
        SparseCoder(create_encoder("linear", d_model=D, n_latents=D_TC), Dictionary(D_TC, D), family="clt")
    _, theirs = circuit_tracer_clt("jump_relu")
    theirs.to_safetensors(str(tmp_path / "missing"))
    (tmp_path / "missing" / "W_dec_1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"W_dec_1.safetensors is missing"):
        sae_zoo.load_sae(tmp_path / "missing")
    theirs.to_safetensors(str(tmp_path / "shape"))
    save_file({"W_dec_1": torch.zeros(D_TC, N_LAYERS, D)}, str(tmp_path / "shape" / "W_dec_1.safetensors"))
    with pytest.raises(ValueError, match=r"'W_dec_1' has shape \(16, 3, 8\), expected \(16, 2, 8\).*n_layers - 1"):
        sae_zoo.load_sae(tmp_path / "shape")
    with torch.no_grad():
        theirs.activation_function.threshold[1, 0, 3] = -0.2
    theirs.to_safetensors(str(tmp_path / "negative"))
    with pytest.raises(ValueError, match=r"W_enc_1.safetensors: 1 thresholds are below 0; circuit-tracer's JumpReLU"):
        sae_zoo.load_sae(tmp_path / "negative")
    skip = CrossLayerTranscoder.create(2, D, D_TC, skip_connection=True)
    with pytest.raises(ValueError, match="circuit-tracer's CLT files hold no skip term"):
        export_circuit_tracer_clt(skip, tmp_path / "skip")
    with pytest.raises(ValueError, match="layer=3: a cross-layer transcoder is written whole"):
        export_circuit_tracer(clt, tmp_path / "whole", 3)
    with pytest.raises(ValueError, match="cross-layer transcoder, one model over all its layers: drop layer=1"):
        sae_zoo.load_sae(tmp_path / "shape", layer=1)
    with torch.no_grad():
        theirs.activation_function.threshold[1, 0, 3] = 0.2
    theirs.to_safetensors(str(tmp_path / "whole"))
    with pytest.raises(ValueError, match=r"is a cross-layer transcoder \(circuit_tracer_clt\).*no single dictionary"):
        sae_zoo.load_sae(tmp_path / "whole").dictionary  # e.g. a recipe's dictionary.pretrained


def test_the_catalogue_lists_the_public_clts():
    names = sae_zoo.list_pretrained("*clt*")
    repos = {sae_zoo.hub.catalogue.catalogue()[n].repo_id for n in names}
    assert {"mntss/clt-gemma-2-2b-426k", "mntss/clt-gemma-2-2b-2.5M", "mntss/clt-llama-3.2-1b-524k",
            "mntss/clt-131k"} <= repos
    assert any(r.startswith("google/gemma-scope-2") for r in repos)


def test_a_stacked_multi_hook_batch_feeds_the_clt():
    pairs = {f"mlp_in.{i}_to_mlp_out.{i}": Pair(torch.full((4, D), float(i)), torch.full((4, D), 10.0 + i))
             for i in range(N_LAYERS)}
    x, target = CrossLayerTranscoder.stack_batch(pairs)
    assert x.shape == (4, N_LAYERS, D) and float(x[0, 2, 0]) == 2 and float(target[0, 1, 0]) == 11
    assert CrossLayerDecoder(2, 4, 3).norms_by_target(1)[:, 0].abs().sum() == 0


def test_batchtopk_across_layers_spends_one_budget_over_every_layer():
    torch.manual_seed(0)
    x, target = synthetic_pairs(2048, seed=3)
    clt = CrossLayerTranscoder.create(N_LAYERS, D, D_TC, {"name": "batchtopk", "k": 2}, across_layers=True, lr=3e-3)
    clt.train()
    codes = torch.stack(clt._codes_across_layers(x[:256] * torch.tensor([4.0, 1.0, 0.5])[:, None]), 1)
    assert int((codes > 0).sum()) == 2 * N_LAYERS * 256  # the batch's budget, over all layers at once
    per_layer = (codes > 0).sum(dim=(0, 2))
    assert per_layer[0] > per_layer[2]  # the layer with the larger inputs takes more of it
    loader = torch.utils.data.DataLoader(list(zip(x.split(128), target.split(128))), batch_size=None)
    L.Trainer(max_steps=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(clt, loader)
    thresholds = torch.stack([h.threshold.detach().reshape(()) for h in clt.encoders])
    assert float(thresholds[0]) > 0 and torch.allclose(thresholds, thresholds[0])
    with torch.no_grad():
        l0 = (clt.eval()(x[:512]).codes > 0).sum(dim=(1, 2)).float().mean()
    assert 0.3 * 2 * N_LAYERS < float(l0) < 3 * 2 * N_LAYERS
    with pytest.raises(ValueError, match="across_layers=True .* the 'topk' head is not batchtopk"):
        CrossLayerTranscoder.create(2, D, D_TC, {"name": "topk", "k": 2}, across_layers=True)


def test_matryoshka_prefixes_add_each_prefixs_own_reconstruction_loss():
    torch.manual_seed(1)
    x, target = synthetic_pairs(64, seed=4)
    for spec in ({"name": "topk", "k": 3}, {"name": "jumprelu"}):
        plain = randomised(CrossLayerTranscoder.create(N_LAYERS, D, D_TC, spec, skip_connection=True), threshold=0.1)
        nested = CrossLayerTranscoder.create(N_LAYERS, D, D_TC, spec, skip_connection=True, matryoshka_widths=[4, D_TC])
        nested.load_state_dict(plain.state_dict())
        plain.train(), nested.train()
        with torch.no_grad():
            full = plain.loss_terms(x, target)["mse"]
            both = nested.loss_terms(x, target)["mse"]
            codes = plain.encode(x)
            codes[..., 4:] = 0  # the first 4 latents of every layer alone
            prefix = ((plain.decode(codes, x) - target) ** 2).mean(dim=(0, 2)).sum()
        torch.testing.assert_close(both, full + prefix, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="matryoshka_widths must end at n_latents"):
        CrossLayerTranscoder.create(2, D, D_TC, matryoshka_widths=[4, 8])
