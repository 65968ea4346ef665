"""Transcoders on a language model: paired activations read in one forward pass, FVU of the target, CE-loss
recovered with the MLP replaced, and the bad input a transcoder recipe can get, on a tiny random Llama."""

import json

import numpy as np
import pytest
import torch
from lm_fixtures import write_tiny_llama
from safetensors.torch import load_file, save_file

from sae_zoo.data import ActivationDataModule, Pair, ShardedActivations
from sae_zoo.evaluation import ce_loss_recovered, evaluate
from sae_zoo.hub import load_sae
from sae_zoo.lm import load_language_model
from sae_zoo.recipe import RecipeError, build, fit, recipe_from_content


def data_kwargs(lm_files, cache, **overrides):
    model, files = lm_files
    return {"model": model, "hook": "mlp_in.1", "hook_out": "mlp_out.1", "data_files": files, "context_len": 16,
            "n_train_tokens": 1500, "n_test_tokens": 300, "test_stride": 4, "shard_tokens": 400, "batch_size": 100,
            "model_batch_size": 8, "cache_dir": str(cache), "ce_contexts": 8, "shuffle_buffer": 600, "cache": True,
            **overrides}


def recipe(lm_files, tmp_path, data=None, **sections):
    content = {"setting": "unknown", "data": {"name": "activations", **data_kwargs(lm_files, tmp_path / "cache",
                                                                                 **(data or {}))},
               "dictionary": {"n_latents": 32}, "encoder": {"name": "topk", "k": 4}, "model": {"lr": 0.003},
               "trainer": {"max_steps": 40, "accelerator": "cpu"}, "probing": {"enabled": False},
               "run_dir": str(tmp_path / "run")}
    for key, value in sections.items():  # a new encoder or dictionary replaces the default; other sections merge
        replaced = key in ("encoder", "dictionary") or not isinstance(value, dict)
        content[key] = value if replaced else {**content.get(key, {}), **value}
    return recipe_from_content(content)


def mlp_of_block_1(lm_files):
    """The tiny Llama, and the input (after the norm, gain included) and output of block 1's MLP on ``tokens``."""
    lm, _ = load_language_model(lm_files[0])
    seen = {}

    def capture(module, args, output):
        seen["in"], seen["out"] = args[0], output

    def read(tokens):
        handle = lm.model.layers[1].mlp.register_forward_hook(capture)
        try:
            with torch.no_grad():
                lm(tokens)
        finally:
            handle.remove()
        return seen["in"], seen["out"]
    return lm, read


def test_the_cache_pairs_each_mlp_input_with_its_output_each_scaled_to_its_own_norm(lm_files, tmp_path):
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    assert dm.paired and (dm.d_model, dm.d_out) == (16, 16)
    dm.prepare_data()
    manifest = dm.manifest()
    shard = manifest["splits"]["test"]["shards"][0]
    tokens = load_file(tmp_path / "cache" / shard["token_ids"])["token_ids"]
    _, read = mlp_of_block_1(lm_files)
    mlp_in, mlp_out = read(tokens)
    cached = load_file(tmp_path / "cache" / shard["file"])
    torch.testing.assert_close(cached["activations"], mlp_in[:, 1:].reshape(-1, 16), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached["targets"], mlp_out[:, 1:].reshape(-1, 16), atol=1e-5, rtol=1e-5)
    assert manifest["scale"] != pytest.approx(manifest["target_scale"], rel=0.1)
    batch = next(iter(dm._dataset("train", shuffle=False)))
    assert isinstance(batch, Pair) and batch.x.shape == batch.target.shape == (100, 16)
    first = torch.cat([b.target for b in dm._dataset("train", shuffle=False)])[:390]  # the first training shard
    assert first.norm(dim=-1).mean().item() == pytest.approx(16 ** 0.5, rel=1e-4)


def test_a_target_of_another_width_makes_a_transcoder_of_that_width(lm_files, tmp_path):
    cfg = recipe(lm_files, tmp_path, {"hook_out": "model.layers.1.mlp.up_proj"})  # the MLP's 32-wide up projection
    run_dir, record = fit(cfg, progress=False)
    dm, model = build(cfg)
    assert (dm.d_model, dm.d_out) == (16, 32)
    assert model.encoder.d_model == 16 and model.dictionary.d_model == 32 and model.transcoder
    assert record["test"]["l0"] == pytest.approx(4.0)


def test_fvu_is_of_the_target_and_ce_loss_recovered_replaces_the_mlp(lm_files, tmp_path):
    cfg = recipe(lm_files, tmp_path, model={"skip_connection": True})
    run_dir, record = fit(cfg, progress=False)
    test = record["test"]
    dm, model = build(cfg)
    model.load_state_dict(torch.load(run_dir / "model.ckpt", weights_only=False)["state_dict"])
    model.eval()
    # FVU of the held-out targets, computed here from the pairs
    pairs = list(dm.held_out_batches())
    x, y = torch.cat([p.x for p in pairs]), torch.cat([p.target for p in pairs])
    with torch.no_grad():
        y_hat, codes = model(x)
    expected = (y - y_hat).square().sum() / (y - y.mean(0)).square().sum()
    assert test["fvu"] == pytest.approx(float(expected), rel=1e-4)
    assert test["fvu"] < 0.9 and test["l0"] == pytest.approx(4.0)
    assert evaluate(model, dm)["fvu"] == pytest.approx(float(expected), rel=1e-4)
    assert {"ce_loss_recovered", "ce_loss_recovered_vs_mean", "ce_mean_ablation"} <= test.keys()
    from sae_zoo.hub import write_card

    card = write_card(run_dir).read_text()  # the card says what it reads and writes, and names every CE figure
    assert "activations at mlp_in.1, writing mlp_out.1 (a transcoder)" in card
    assert "CE-loss recovered against mean ablation" in card


def test_ce_loss_recovered_is_one_with_the_mlp_itself_and_zero_with_zeros(lm_files, tmp_path):
    weighty = write_tiny_llama(tmp_path / "model", initializer_range=0.3)  # an MLP whose ablation matters
    dm = ActivationDataModule(**data_kwargs((weighty, lm_files[1]), tmp_path / "cache", hook="mlp_in.0",
                                            hook_out="mlp_out.0"))
    lm, _ = load_language_model(weighty)
    mlp = lm.model.layers[0].mlp

    class TheMLP(torch.nn.Module):
        """A perfect transcoder: the MLP itself, between the data's scales."""

        transcoder = True

        def forward(self, x):
            y = mlp(x / dm.scale) * dm.target_scale
            return y, y

    class Zero(torch.nn.Module):
        transcoder = True

        def forward(self, x):
            return torch.zeros_like(x), x

    perfect, zero = ce_loss_recovered(TheMLP(), dm), ce_loss_recovered(Zero(), dm)
    assert perfect["ce_spliced"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    assert perfect["ce_zero_ablation"] - perfect["ce_clean"] > 1e-3  # block 0's MLP matters to the loss
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-2)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_loss_recovered_vs_mean"] < perfect["ce_loss_recovered_vs_mean"]
    # mean ablation writes the training targets' mean at every kept position
    assert perfect["ce_mean_ablation"] != pytest.approx(perfect["ce_zero_ablation"])


def test_a_pair_is_an_outlier_when_either_side_is():
    x, target = torch.ones(6, 2), torch.ones(6, 3)
    x[1] *= 100
    target[4] *= 100
    sharded = ShardedActivations.__new__(ShardedActivations)  # only the bounds matter here
    sharded.max_norms = (5.0, 5.0)
    assert sharded.outliers(Pair(x, target)).tolist() == [False, True, False, False, True, False]


def test_paired_shards_serve_the_same_rows_on_both_sides(tmp_path):
    rows = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
    files = []
    for i, part in enumerate(np.array_split(rows, 3)):
        files.append(tmp_path / f"train-{i:05d}.safetensors")
        part = torch.from_numpy(part)
        save_file({"activations": part, "targets": -2 * part[:, :2].contiguous()}, files[-1])
    data = ShardedActivations(files, 64, shuffle=True, shuffle_buffer=128, seed=1, scale=2.0, target_scale=0.5)
    for batch in data:
        torch.testing.assert_close(batch.target, -0.5 * batch.x[:, :2])


@pytest.mark.parametrize("data, message", [
    ({"hook": "mlp_out.1", "hook_out": "model.layers.1.mlp"},
     r"data.hook_out 'model.layers.1.mlp' is the same place as data.hook 'mlp_out.1' \(the output of "
     r"model.layers.1.mlp\)"),
    ({"hook_out": "mlp_out.7"}, r"hook 'mlp_out.7': the model has blocks 0..2"),
    ({"hook_out": "model.layers.1.mlpp"}, r"hook 'model.layers.1.mlpp' is not a module of LlamaForCausalLM.*"
                                          r"close matches: model.layers.1.mlp"),
    ({"hook": "mlp_out.1", "hook_out": "mlp_in.1"}, r"hook_out 'mlp_in.1' comes before hook 'mlp_out.1' in the "
                                                    r"forward pass"),
])
def test_hooks_a_transcoder_cannot_pair(lm_files, tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        fit(recipe(lm_files, tmp_path, data), progress=False)


def test_a_transcoder_and_its_data_must_agree(lm_files, tmp_path):
    with pytest.raises(RecipeError, match=r"model: a transcoder learns a target from an input .* "
                                          r"the data must pair them \(data.hook_out"):
        build(recipe(lm_files, tmp_path, {"hook": "resid_post.1", "hook_out": None}, model={"transcoder": True}))
    with pytest.raises(RecipeError, match=r"these data pair each input with a target at another hook .* "
                                          r"this model \(the 'sae' family\) reconstructs its input: drop data.hook_out"):
        build(recipe(lm_files, tmp_path, model={"transcoder": False}))
    with pytest.raises(ValueError, match=r"skip_connection=True adds a linear map of the input to the output: a "
                                         r"transcoder's"):
        build(recipe(lm_files, tmp_path, {"hook": "resid_post.1", "hook_out": None}, model={"skip_connection": True}))
    # a transcoder scored on unpaired data would be scored against its input
    _, model = build(recipe(lm_files, tmp_path))
    sae_data = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "sae_cache", hook="mlp_out.1", hook_out=None))
    with pytest.raises(ValueError, match=r"a transcoder learns a target .* its output "
                                         r"would be scored against its input"):
        evaluate(model, sae_data)
    with pytest.raises(ValueError, match=r"the batch's targets are 32 wide \(shape \(5, 32\)\), but this transcoder "
                                         r"writes d_out=16"):
        model.checked_batch(Pair(torch.randn(5, 16), torch.randn(5, 32)))


def test_an_iterative_head_is_refused_as_a_transcoder_with_the_reason(lm_files, tmp_path):
    with pytest.raises(ValueError, match=r"encoder 'fista' cannot encode for a transcoder: it finds its codes by "
                                         r"reconstructing its input"):
        build(recipe(lm_files, tmp_path, encoder={"name": "fista", "steps": 5}))


def test_a_trained_skip_transcoder_exports_to_saelens_with_both_scales_folded(lm_files, tmp_path):
    """Trained on inputs and targets scaled apart, exported for SAELens on raw activations: SAELens's own code gives
    the model's codes, and its outputs over the targets' scale, skip term included."""
    from sae_zoo.hub import export_saelens, load_run

    SAE = pytest.importorskip("sae_lens").SAE
    run_dir, _ = fit(recipe(lm_files, tmp_path, encoder={"name": "batchtopk", "k": 4},
                            model={"skip_connection": True}), progress=False)
    model, _, _ = load_run(run_dir)
    model.eval()
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    assert dm.scale != pytest.approx(dm.target_scale, rel=0.1)
    out = export_saelens(model, tmp_path / "exported")
    theirs = SAE.load_from_disk(str(out))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["metadata"]["hook_name"] == "mlp_in.1" and cfg["metadata"]["hook_name_out"] == "mlp_out.1"
    raw = torch.cat([p.x for p in dm.held_out_batches()]) / dm.scale
    with torch.no_grad():
        ours = model(raw * dm.scale)
        torch.testing.assert_close(theirs.encode(raw), ours.codes, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs(raw), ours.x_hat / dm.target_scale, atol=1e-4, rtol=1e-4)
    assert (ours.codes != 0).any() and model.skip.weight.abs().sum() > 0


def test_module_paths_name_a_side_as_gemma_scope_2_and_sparsify_do(lm_files):
    from sae_zoo.lm import resolve_hook

    lm, _ = load_language_model(lm_files[0])
    for name, side in (("model.layers.1.mlp.input", "input"), ("model.layers.1.mlp.output", "output"),
                       ("layers.1.mlp.input", "input"), ("blocks.1.hook_mlp_out", "output")):
        hook = resolve_hook(lm, name)
        assert (hook.path, hook.side, hook.module) == ("model.layers.1.mlp", side, lm.model.layers[1].mlp), name
    assert resolve_hook(lm, "mlp_in.1").same_place(resolve_hook(lm, "model.layers.1.mlp.input"))
    for other in ("blocks.1.hook_mlp_in", "blocks.1.ln2.hook_normalized"):  # before the norm, or before its gain
        with pytest.raises(ValueError, match=f"hook '{other}' is not a module of LlamaForCausalLM nor an alias"):
            resolve_hook(lm, other)


def test_a_head_trained_on_a_skip_transcoders_frozen_decoder_keeps_its_skip_term(lm_files, tmp_path):
    run_dir, _ = fit(recipe(lm_files, tmp_path, model={"skip_connection": True}), progress=False)
    source = load_sae(run_dir)
    cfg = recipe(lm_files, tmp_path, setting="known_dictionary", dictionary={"pretrained": str(run_dir)},
                 encoder={"name": "mlp", "hidden": 16}, run_dir=str(tmp_path / "mlp"))
    mlp_dir, record = fit(cfg, progress=False)
    model = load_sae(mlp_dir).model()
    assert model.transcoder and record["test"]["fvu"] < 1
    torch.testing.assert_close(model.skip.weight, source.skip)  # frozen with the decoder it belongs to
    torch.testing.assert_close(model.dictionary.atoms, source.dictionary.atoms)
    sae_data = {"hook": "mlp_out.1", "hook_out": None, "cache_dir": str(tmp_path / "sae_cache")}
    sae_dir, _ = fit(recipe(lm_files, tmp_path, sae_data, run_dir=str(tmp_path / "sae")), progress=False)
    with pytest.raises(RecipeError, match=r"dictionary.pretrained: .* is an SAE's decoder, and this recipe trains a "
                                          r"transcoder"):
        build(recipe(lm_files, tmp_path, setting="known_dictionary", dictionary={"pretrained": str(sae_dir)},
                     encoder={"name": "mlp", "hidden": 16}))


def test_an_sae_pointed_at_a_transcoders_cache_is_refused(lm_files, tmp_path):
    ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache")).prepare_data()
    with pytest.raises(ValueError, match=r"describes other activations \(hook_out: cache has 'mlp_out.1', recipe asks "
                                         r"None\)"):
        ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache", hook_out=None)).prepare_data()


def test_sae_zoo_export_writes_a_trained_transcoder_for_circuit_tracer(lm_files, tmp_path, capsys):
    from sae_zoo.cli import main
    from sae_zoo.hub import load_run

    run_dir, _ = fit(recipe(lm_files, tmp_path, encoder={"name": "linear"}, model={"l1_coeff": 0.05}), progress=False)
    out = tmp_path / "set"
    hooks = ["--feature-input-hook", "mlp.hook_in", "--feature-output-hook", "hook_mlp_out"]
    assert main(["export", str(run_dir), str(out), "--to", "circuit_tracer", "--layer", "1", *hooks]) == 0
    assert main(["export", str(run_dir), str(out), "--to", "circuit_tracer"]) != 0
    assert "--to circuit_tracer writes one transcoder per layer: pass --layer N" in capsys.readouterr().err
    model, _, _ = load_run(run_dir)
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    raw = torch.cat([p.x for p in dm.held_out_batches()]) / dm.scale
    loaded = load_sae(out, layer=1)
    assert loaded.metadata["hook_name"] == "blocks.1.mlp.hook_in" and loaded.skip is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.model()(raw).x_hat, model.eval()(raw * dm.scale).x_hat / dm.target_scale,
                                   atol=1e-4, rtol=1e-4)
