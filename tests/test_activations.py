"""Language-model activations: the by-name/by-path loading code on a tiny randomly initialised model and
text written here, the activation cache (resume, refusal), CE-loss recovered, suites and bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_zoo.data.activations as activations
from sae_zoo.data import ActivationDataModule, ShardedActivations
from sae_zoo.evaluation import ce_loss_recovered
from sae_zoo.lm import load_language_model, resolve_hook
from sae_zoo.recipe import RecipeError, fit, recipe_from_content


def data_kwargs(lm_files, cache_dir, **overrides):
    model, files = lm_files
    return {"model": model, "hook": "resid_post.1", "data_files": files, "context_len": 16, "n_train_tokens": 1500,
            "n_test_tokens": 300, "test_stride": 4, "shard_tokens": 400, "batch_size": 100, "model_batch_size": 8,
            "cache_dir": str(cache_dir), "ce_contexts": 8, "shuffle_buffer": 600, "cache": True, **overrides}


def sae_recipe(lm_files, tmp_path, **data):
    return {"setting": "unknown", "data": {"name": "activations", **data_kwargs(lm_files, tmp_path / "cache", **data)},
            "dictionary": {"n_latents": 32, "bias": True}, "encoder": {"name": "linear", "subtract_decoder_bias": True},
            "model": {"l1_coeff": 0.1, "lr": 0.003}, "trainer": {"max_steps": 60, "accelerator": "cpu"},
            "run_dir": str(tmp_path / "sae")}


def test_cached_activations_are_the_models_hidden_states(lm_files, tmp_path):
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    dm.prepare_data()
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["d_model"] == 16 and manifest["identity"]["hook"] == "resid_post.1"
    contexts = [manifest["splits"][s]["contexts_done"] for s in ("test", "train")]
    assert contexts == [20, 100]  # ceil(300 / 15), ceil(1500 / 15): 15 tokens per context once BOS is dropped
    assert sum(s["tokens"] for s in manifest["splits"]["train"]["shards"]) == 1500

    lm, tokenizer = load_language_model(lm_files[0])
    shard = manifest["splits"]["test"]["shards"][0]
    tokens = load_file(tmp_path / "cache" / shard["token_ids"])["token_ids"]
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        hidden = lm(tokens, output_hidden_states=True).hidden_states[2]  # the output of block 1
    cached = load_file(tmp_path / "cache" / shard["file"])["activations"]
    torch.testing.assert_close(cached, hidden[:, 1:].reshape(-1, 16), atol=1e-5, rtol=1e-5)
    # served data are scaled so that the mean norm is sqrt(d_model)
    x = dm.test_x
    assert x.shape == (300, 16)
    train = torch.cat(list(dm._dataset("train", shuffle=False)))
    assert train.norm(dim=-1)[:390].mean().item() == pytest.approx(16 ** 0.5, rel=1e-4)  # the first shard


def test_an_interrupted_collection_resumes_without_losing_or_repeating_anything(lm_files, tmp_path, monkeypatch):
    ActivationDataModule(**data_kwargs(lm_files, tmp_path / "whole")).prepare_data()

    real, calls = activations.read_activations, {"n": 0}

    def crash_in_the_third_training_shard(*args):
        calls["n"] += 1
        if calls["n"] == 12:  # the test shard takes 3 LM batches, each training shard 4
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(activations, "read_activations", crash_in_the_third_training_shard)
    with pytest.raises(KeyboardInterrupt):
        ActivationDataModule(**data_kwargs(lm_files, tmp_path / "resumed")).prepare_data()
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert 0 < partial["splits"]["train"]["contexts_done"] < 100 and not partial["splits"]["train"]["complete"]
    monkeypatch.setattr(activations, "read_activations", real)
    ActivationDataModule(**data_kwargs(lm_files, tmp_path / "resumed")).prepare_data()

    whole, resumed = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "resumed"))
    assert resumed == whole
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for path in (tmp_path / "whole").glob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "resumed" / path.name).read_bytes(), path.name


def test_a_cache_of_other_activations_is_refused(lm_files, tmp_path):
    ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache")).prepare_data()
    other = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache", context_len=12, hook="resid_pre.2"))
    with pytest.raises(ValueError, match=r"manifest.json describes other activations \(hook: cache has 'resid_post.1', "
                                         r"recipe asks 'resid_pre.2'; context_len: cache has 16, recipe asks 12\)"):
        other.prepare_data()


def test_ce_loss_recovered_is_one_for_a_perfect_reconstruction_and_zero_for_zeros(lm_files, tmp_path):
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x, x

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x), x

    perfect, zero = ce_loss_recovered(Identity(), dm), ce_loss_recovered(Zero(), dm)
    assert perfect["ce_spliced"] == pytest.approx(perfect["ce_clean"], abs=1e-6)
    # the scale's round trip moves the spliced loss by float rounding, which the ratio divides by the ablation's gap
    tolerance = 1e-6 / abs(perfect["ce_zero_ablation"] - perfect["ce_clean"])
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=tolerance)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_zero_ablation"] != pytest.approx(zero["ce_clean"])


def test_sharded_batches_split_across_ranks_are_the_single_device_batches(tmp_path):
    rows = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    files = []
    for i, part in enumerate(np.array_split(rows, 3)):
        files.append(tmp_path / f"s{i}.safetensors")
        save_file({"activations": torch.from_numpy(part)}, str(files[-1]))
    one = list(ShardedActivations(files, 100, shuffle=True, shuffle_buffer=400, seed=3))
    two = [list(ShardedActivations(files, 100, shuffle=True, shuffle_buffer=400, seed=3, rank=r,
                                   world_size=2)) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 10
    for batch, a, b in zip(one, *two):
        assert torch.equal(batch, torch.cat([a, b]))
    seen = torch.cat(one)[:, 0].long() // 4
    assert sorted(seen.tolist()) == list(range(1000))  # every row once per pass
    assert not torch.equal(seen, torch.arange(1000))  # and shuffled


def test_tiny_model_end_to_end_sae_then_heads_on_its_decoder(lm_files, tmp_path):
    run_dir, metrics = fit(recipe_from_content(sae_recipe(lm_files, tmp_path)), progress=False)
    test = metrics["test"]
    assert 0 < test["fvu"] < 1 and 0 < test["l0"] < 32
    assert {"ce_clean", "ce_zero_ablation", "ce_spliced", "ce_loss_recovered"} <= test.keys()
    sae = torch.load(run_dir / "model.ckpt", weights_only=False)
    assert sae["decoder_provenance"]["hook_name"] == "resid_post.1" and sae["decoder_provenance"]["input_scale"] > 0
    from huggingface_hub import ModelCard

    from sae_zoo.hub import write_card

    card = ModelCard.load(write_card(run_dir), ignore_metadata_errors=False)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["ce_loss_recovered"] == pytest.approx(test["ce_loss_recovered"])
    assert card.data.base_model is None and card.data.datasets is None  # a local model and local text files
    assert "language-model-activations" in {r.dataset_type for r in card.data.eval_results}
    # every run on LM activations reports sparse probing on the State of the Union tasks, in its card too
    assert {f"probe_{task}_{k}" for task in ("party", "era", "delivery") for k in ("k1", "k2", "k5", "k20", "dense")} \
        <= test.keys()
    assert all(0 <= test[k] <= 1 for k in test if k.startswith("probe_") and not k.endswith("_se"))
    assert results["probe_k5"] == pytest.approx(test["probe_k5"])
    probe_result = next(r for r in card.data.eval_results if r.metric_type == "probe_party_k1")
    assert probe_result.task_type == "text-classification" and "State of the Union" in probe_result.dataset_name
    assert "the probing rows on labelled documents of the State of the Union" in card.text

    fista = sae_recipe(lm_files, tmp_path)
    fista.update(setting="known_dictionary", dictionary={"pretrained": str(run_dir)}, run_dir=str(tmp_path / "fista"),
                 encoder={"name": "fista", "steps": 100, "l1_coeff": 0.1, "warm_start": {"pretrained": str(run_dir)}})
    _, refined = fit(recipe_from_content(fista), progress=False)
    assert refined["steps"] == 0  # nothing to train: FISTA seeded by the SAE's own, frozen, encoder
    assert refined["test"]["fvu"] < test["fvu"]  # optimising the codes beats the amortised encoder


def test_a_suite_runs_its_runs_in_order_and_compares_them(lm_files, tmp_path, capsys, monkeypatch):
    from sae_zoo.cli import main

    recipe = sae_recipe(lm_files, tmp_path)
    recipe.pop("run_dir")
    suite = {"title": "tiny", "base": recipe, "runs": [
        {"name": "sae", "label": "SAE"},
        {"name": "mlp", "label": "MLP head", "recipe": {"setting": "known_dictionary",
                                                        "dictionary": {"pretrained": "run:sae"},
                                                        "encoder": {"name": "mlp", "hidden": 16}}}],
        "quick": {"base": {"trainer": {"max_steps": 20}}}}
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(suite))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["fit", str(path), "--quick", "--no-progress", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert "MLP head" in out and "CE recovered" in out
    (folder,) = (tmp_path / "work" / "runs").glob("suite-quick-*")
    assert {"comparison.csv", "comparison.md", "comparison.png", "sae", "mlp"} <= {p.name for p in folder.iterdir()}
    mlp = json.loads((folder / "mlp" / "metrics.json").read_text())
    assert mlp["steps"] == 20 and mlp["seed"] == 1
    # run_dir names the suite's folder, in which each run has its own
    assert main(["fit", str(path), "--quick", "--no-progress", "run_dir=named"]) == 0
    assert {"comparison.md", "sae", "mlp"} <= {p.name for p in (tmp_path / "work" / "named").iterdir()}


# ---- bad input, each caught before any long work ----

def test_a_hook_that_does_not_exist_lists_close_matches(lm_files, tmp_path):
    lm, _ = load_language_model(lm_files[0])
    with pytest.raises(ValueError, match=r"hook 'model.layer.1' is not a module of LlamaForCausalLM.*close matches: "
                                         r"model.layers.1"):
        resolve_hook(lm, "model.layer.1")
    with pytest.raises(ValueError, match=r"hook 'resid_post.7': the model has blocks 0..2"):
        resolve_hook(lm, "resid_post.7")
    assert resolve_hook(lm, "blocks.2.hook_resid_pre").side == "input"
    sparsify_name = resolve_hook(lm, "layers.1")  # relative to the base model, as sparsify's hookpoints are
    assert sparsify_name.path == "model.layers.1" and sparsify_name.module is lm.model.layers[1]


def test_bad_data_settings_fail_before_collecting(lm_files, tmp_path):
    with pytest.raises(ValueError, match=r"data.text_column: the dataset 'text' has no column 'body' nor a pre-tokenised one \(input_ids, tokens\); its columns are text"):
        _ = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "c1", text_column="body")).d_model
    with pytest.raises(ValueError, match=r"data.context_len 100 is longer than .* allows \(64\)"):
        _ = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "c2", context_len=100)).d_model
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_an_activation_width_that_does_not_match_the_dictionary(lm_files, tmp_path):
    from sae_zoo import Dictionary, SparseCoder, create_encoder

    SparseCoder(create_encoder("linear", d_model=24, n_latents=8), Dictionary(8, 24)).save_pretrained(tmp_path / "w24")
    recipe = sae_recipe(lm_files, tmp_path)
    recipe.update(setting="known_dictionary", dictionary={"pretrained": str(tmp_path / "w24")})
    with pytest.raises(RecipeError, match=r"dictionary.pretrained: .*w24 has atoms of width 24, but the data's inputs "
                                          r"are 16 wide"):
        fit(recipe_from_content(recipe), progress=False)
    assert not (tmp_path / "cache").exists()  # refused before collecting
    recipe.update(setting="known_dictionary", dictionary={})
    with pytest.raises(RecipeError, match=r"data 'activations' has no true dictionary; the known_dictionary setting "
                                          r"needs dictionary.pretrained"):
        recipe_from_content(recipe)


def test_outlier_tokens_are_left_out_counted_and_reported_with_standard_errors(lm_files, tmp_path):
    from sae_zoo import Dictionary, SparseCoder, create_encoder
    from sae_zoo.evaluation import evaluate, held_out_pass
    from sae_zoo.metrics.functional import fraction_of_variance_unexplained

    def held_out_statistics(model, dm):
        return held_out_pass(model, dm).tokens.figures()

    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    dm.prepare_data()
    # make massive activations, as some LMs put on their first tokens: rows 3 and 40 of each split's first shard
    for split in ("train", "test"):
        path = dm.cache_dir / dm.manifest()["splits"][split]["shards"][0]["file"]
        rows = load_file(str(path))["activations"]
        rows[[3, 40]] *= 200
        save_file({"activations": rows}, str(path))
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    first = load_file(str(dm.cache_dir / dm.manifest()["splits"]["train"]["shards"][0]["file"]))["activations"]
    assert dm.outlier_norm == pytest.approx(10 * float(first.norm(dim=-1).median()) * dm.scale)
    train = torch.cat(list(dm.train_dataloader()))
    assert float(train.norm(dim=-1).max()) < dm.outlier_norm
    every = torch.cat(list(dm.held_out_rows()))
    outlier = every.norm(dim=-1) > dm.outlier_norm
    assert int(outlier.sum()) == 2 and torch.equal(dm.test_x, every[~outlier])

    torch.manual_seed(0)
    model = SparseCoder(create_encoder("linear", d_model=16, n_latents=32), Dictionary(32, 16, bias=True)).eval()
    stats = held_out_statistics(model, dm)
    assert stats["outlier_tokens"] == 2 and stats["held_out_tokens"] == len(every)
    assert stats["fvu"] == pytest.approx(evaluate(model, dm)["fvu"], rel=1e-5)  # the same tokens as every metric
    with torch.no_grad():
        expected = fraction_of_variance_unexplained(model(every).x_hat, every)
    assert stats["fvu_with_outliers"] == pytest.approx(float(expected), rel=1e-5)
    assert 0 < stats["fvu_se"] < 0.5 * stats["fvu"] and stats["fvu_with_outliers_se"] > 0

    ce = ce_loss_recovered(model, dm)
    assert ce["ce_contexts"] == 8 and 0 < ce["ce_loss_recovered_se"] < float("inf")

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x, x

    perfect = ce_loss_recovered(Identity(), dm)  # 1 in every resample of the contexts, to float rounding
    tolerance = 1e-6 / abs(perfect["ce_zero_ablation"] - perfect["ce_clean"])  # as in the test above
    assert perfect["ce_loss_recovered"] == pytest.approx(1, abs=tolerance)
    assert perfect["ce_loss_recovered_se"] == pytest.approx(0, abs=tolerance)

    kept = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache", outlier_factor=None))
    assert kept.outlier_norm is None and held_out_statistics(model, kept)["outlier_tokens"] == 0
    with pytest.raises(ValueError, match="data.outlier_factor must be above 1"):
        ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache", outlier_factor=0.5))


def test_one_pass_over_the_held_out_tokens_gives_the_two_passes_figures(lm_files, tmp_path):
    """``held_out_pass`` reads every held-out token once, for the test metrics and the per-context sums, with the
    figures of the metrics over the held-out batches and of a separate pass of ``context_sums``."""
    from sae_zoo import Dictionary, SparseCoder, create_encoder
    from sae_zoo.evaluation import held_out_pass
    from sae_zoo.evaluation.held_out import token_sums

    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    dm.prepare_data()
    path = dm.cache_dir / dm.manifest()["splits"]["test"]["shards"][0]["file"]  # two outlier tokens
    rows = load_file(str(path))["activations"]
    rows[[3, 40]] *= 200
    save_file({"activations": rows}, str(path))
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache"))
    torch.manual_seed(0)
    model = SparseCoder(create_encoder("topk", d_model=16, n_latents=32, k=4), Dictionary(32, 16, bias=True)).eval()
    encoded = []
    model.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    evaluation = held_out_pass(model, dm)
    test, sums = evaluation.metrics, evaluation.tokens
    stats = sums.figures()
    assert sum(encoded) == stats["held_out_tokens"] and stats["outlier_tokens"] > 0  # each token once

    reference = model.new_metrics(sync_on_compute=False)  # the two passes: the metrics' own batches, then the sums
    with torch.no_grad():
        for batch in dm.held_out_batches():
            model.update_metrics(reference, batch)
    expected = {name: float(value) for name, value in reference.compute().items()}
    assert {name: float(value) for name, value in test.items()} == pytest.approx(expected, rel=1e-5, abs=1e-7)
    separate = token_sums(model, dm)
    for kind in ("clean", "every"):
        for name in ("sse", "tokens", "sum_sq", "sum_x"):
            torch.testing.assert_close(getattr(getattr(sums, kind), name), getattr(getattr(separate, kind), name))


def test_an_outlier_is_one_definition_on_any_device(lm_files, tmp_path, monkeypatch):
    """``outlier_mask`` answers on its input's device, with or without an outlier norm, and CE-loss recovered's
    splice leaves out exactly the tokens it names (one definition of an outlier for the data and the splice)."""
    import sae_zoo.evaluation.language_model as language_model
    from sae_zoo.data.activations import outlier_mask

    x = torch.ones(2, 3, 4, device="meta")
    assert outlier_mask(x, None).device.type == "meta" and outlier_mask(x, 1.0).device.type == "meta"
    named = []

    def every_token_an_outlier(acts, max_norm):
        named.append(max_norm)
        return torch.ones(acts.shape[:-1], dtype=torch.bool, device=acts.device)

    class Data:  # what the splice reads of a datamodule
        scale = target_scale = 2.0
        outlier_norm = target_outlier_norm = 7.0

        def ce_batches(self):
            return None, 2.0, False

    monkeypatch.setattr(activations, "outlier_mask", every_token_an_outlier)
    replace = language_model._splice(torch.zeros_like, Data())
    acts = torch.randn(2, 5, 4)
    assert torch.equal(replace(acts), acts) and named == [7.0]  # every token kept its own activations


def test_the_caches_are_named_by_one_cache_key(lm_files, tmp_path):
    from sae_zoo._io import cache_key

    dm = ActivationDataModule(**{**data_kwargs(lm_files, tmp_path / "unused"), "cache_dir": None})
    assert dm.cache_dir.name == cache_key(dm.identity) and len(cache_key(dm.identity)) == 16
