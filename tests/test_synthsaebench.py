"""SynthSAEBench through SAELens's own generator: the datamodule, its cache and checks, the metrics
against SAELens's evaluator on the same model and samples, and suites with SAELens's own SAEs."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("sae_lens.synthetic", reason="SynthSAEBench needs the synthsaebench extra (sae-lens)")

from sae_lens import SAE  # noqa: E402
from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data  # noqa: E402

from sae_zoo import SparseCoder  # noqa: E402
from sae_zoo.data import SynthSAEBenchDataModule  # noqa: E402
from sae_zoo.data.synthsaebench import SHA256_RECORD, draw, save_model  # noqa: E402
from sae_zoo.hub import load_sae  # noqa: E402
from sae_zoo.hub.formats import export_saelens  # noqa: E402
from sae_zoo.recipe import RecipeError, build, fit, load_recipe, plan  # noqa: E402
from sae_zoo.suite import run_suite  # noqa: E402

TINY = {"num_features": 64, "hidden_dim": 16,
        "firing_probability": {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.4, "min_prob": 0.01},
        "hierarchy": {"total_root_nodes": 2, "branching_factor": 3, "max_depth": 2, "mutually_exclusive_portion": 1.0,
                      "scale_children_by_parent": True},
        "correlation": {"rank": 2, "correlation_scale": 0.1}, "orthogonalization": {"num_steps": 10},
        "mean_firing_magnitudes": {"generator_name": "linear", "start": 5.0, "end": 4.0},
        "std_firing_magnitudes": {"generator_name": "folded_normal", "mean": 0.5, "std": 0.5}, "seed": 5}


def tiny_data(tmp_path, **kwargs):
    options = {"config": TINY, "n_train": 4096, "n_test": 2048, "batch_size": 256, "cache_dir": str(tmp_path / "cache")}
    return SynthSAEBenchDataModule(**{**options, **kwargs})


def recipe_file(tmp_path, **sections):
    content = {"setting": "unknown", "seed": 1,
               "data": {"name": "synthsaebench", "config": TINY, "n_train": 4096, "n_test": 2048, "batch_size": 256,
                        "cache_dir": str(tmp_path / "cache")},
               "dictionary": {"n_latents": 32, "bias": True}, "encoder": {"name": "topk", "k": 3},
               "model": {"l1_coeff": 0.0, "lr": 0.003, "code_recovery": False},
               "trainer": {"max_steps": 40, "enable_progress_bar": False}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_samples_are_saelens_own_draws_seeded_and_cached(tmp_path):
    dm = tiny_data(tmp_path)
    dm.prepare_data()
    x, codes = dm.test_x, dm.test_codes
    assert x.shape == (2048, 16) and codes.shape == (2048, 64) and dm.n_latents == 64 and dm.d_model == 16
    # the generator's own map from features to inputs, exactly
    vectors, bias = dm.generator.feature_dict.feature_vectors.detach(), dm.generator.feature_dict.bias.detach()
    torch.testing.assert_close(codes @ vectors + bias, x, rtol=1e-5, atol=1e-5)
    assert torch.equal(dm.dictionary, vectors)
    # SAELens's sampler itself under the same seed: the cache changes nothing about the distribution
    x_again, codes_again = draw(dm.generator, 2048, 0, -1)
    assert torch.equal(x_again, x) and torch.equal(codes_again, codes)
    batches = list(dm.held_out_batches())  # the sparse store made dense one batch at a time
    assert len(batches) == 8 and torch.equal(torch.cat([c for _, c in batches]), codes)
    rates = (codes > 0).float().mean(0)
    assert 1.0 < dm.true_l0 == pytest.approx(float(rates.sum()))
    # a second datamodule reads the same cache; another seed draws other samples
    again = tiny_data(tmp_path)
    assert again.samples_dir == dm.samples_dir and torch.equal(again.test_x, x)
    assert not torch.equal(tiny_data(tmp_path, seed=1).test_x, x)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4096 // 256 and batches[0].shape == (256, 16)
    train = torch.cat(batches)
    # no held-out sample is drawn again for training (one without active features is the bias alone in both)
    trained_rows = {row.numpy().tobytes() for row in train}
    assert not any(row.numpy().tobytes() in trained_rows for row in x[(codes != 0).any(1)])


def test_streamed_samples_are_fresh_and_repeat_with_the_seed(tmp_path):
    first = [b.clone() for b in tiny_data(tmp_path, stream=True, n_train=1024).train_dataloader()]
    again = [b.clone() for b in tiny_data(tmp_path, stream=True, n_train=1024).train_dataloader()]
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_a_saved_model_is_checked_against_its_sha256(tmp_path):
    from sae_zoo.data.synthsaebench import model_config

    folder = save_model(SyntheticModel(model_config(TINY)), tmp_path / "model")
    record = json.loads((folder / SHA256_RECORD).read_text())["files"]
    assert set(record) >= {"synthetic_model_config.json", "synthetic_model.safetensors"}
    loaded = SynthSAEBenchDataModule(model=str(folder), n_train=256, n_test=256, cache_dir=str(tmp_path / "c"))
    assert loaded.n_latents == 64
    weights = folder / "synthetic_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"synthetic_model.safetensors: sha256 [0-9a-f]{64} does not match its record"):
        SynthSAEBenchDataModule(model=str(folder), n_train=256, n_test=256, cache_dir=str(tmp_path / "c"))


def test_a_config_saelens_rejects_names_the_file_and_key(tmp_path):
    path = recipe_file(tmp_path)
    with pytest.raises(RecipeError, match=r"recipe.yaml: data.config.hierarchy: SAELens rejects this SynthSAEBench "
                                          r"config: .*total_root_nodes must be positive"):
        load_recipe(path, ["data.config.hierarchy.total_root_nodes=0"])
    with pytest.raises(RecipeError, match=r"recipe.yaml: data.config.num_features: SAELens rejects .*num_features must "
                                          r"be at least 1"):
        load_recipe(path, ["data.config.num_features=0"])
    with pytest.raises(RecipeError, match=r"data.config.colour: SAELens rejects .*unexpected keyword argument 'colour'"):
        load_recipe(path, ["data.config.colour=red"])
    with pytest.raises(RecipeError, match="data.model or data.config must be given"):
        load_recipe(path, ["~data.config"])
    with pytest.raises(ValueError, match=r"data.model: .*is neither a folder nor a SynthSAEBench model"):
        SynthSAEBenchDataModule(model="no-such-owner/no-such-model", cache_dir=str(tmp_path / "c"))


def test_a_target_l0_above_the_datas_is_refused(tmp_path):
    cfg = load_recipe(recipe_file(tmp_path), ["encoder.name=linear", "~encoder.k", "model.target_l0=40", "model.l1_coeff=1.0"])
    with pytest.raises(RecipeError, match=r"model.target_l0: 40 is unreachable: the data's true L0 is [\d.]+ and the "
                                          r"width ratio 32/64 allows at most"):
        build(plan(cfg))
    build(plan(load_recipe(recipe_file(tmp_path), ["encoder.name=linear", "~encoder.k", "model.target_l0=1.5", "model.l1_coeff=1.0"])))


def _saelens_eval(sae, generator, seed, n=2048):
    torch.manual_seed(seed)
    return eval_sae_on_synthetic_data(sae, generator.feature_dict, generator.activation_generator, num_samples=n)


def _ours_on_the_same_samples(model, generator, seed, n=2048):
    torch.manual_seed(seed)
    codes = generator.activation_generator.sample(n)
    x = generator.feature_dict(codes)
    metrics = model.new_metrics(sync_on_compute=False)
    with torch.no_grad():
        model.update_metrics(metrics, (x, codes))
    model.update_dictionary_metrics(metrics)
    return metrics.compute()


@pytest.mark.parametrize("trained_by", ["sae_zoo", "saelens"])
def test_metrics_agree_with_saelens_evaluator_on_the_same_model_and_samples(tmp_path, trained_by):
    """SAELens's eval_sae_on_synthetic_data and sae_zoo's metrics on one trained SAE (trained by either
    library, saved in SAELens's format, each library reading it with its own loader) and the same samples."""
    from sae_zoo.peers import fit_saelens

    path = recipe_file(tmp_path)
    if trained_by == "sae_zoo":
        run_dir, _ = fit(load_recipe(path, [f"run_dir={tmp_path / 'run'}"]), progress=False)
        ours = SparseCoder.load_from_checkpoint(run_dir / "model.ckpt", map_location="cpu")
        export_saelens(ours, tmp_path / "saelens")
        folder = tmp_path / "saelens"
    else:
        run_dir, _ = fit_saelens(load_recipe(path, [f"run_dir={tmp_path / 'run'}"]), {"architecture": "batchtopk", "k": 3})
        folder = run_dir / "saelens"
    dm = tiny_data(tmp_path)
    loaded = load_sae(folder)
    model = SparseCoder(loaded.encoder, loaded.dictionary, true_dictionary=dm.dictionary, code_recovery=False).eval()
    theirs = _saelens_eval(SAE.load_from_disk(folder), dm.generator, seed=11)
    mine = _ours_on_the_same_samples(model, dm.generator, seed=11)
    classification = theirs.classification
    assert 0.05 < classification.f1_score < 1.0  # a model that has learned something, not a trivial one
    pairs = {"latent_f1": classification.f1_score, "latent_precision": classification.precision,
             "latent_recall": classification.recall, "latent_accuracy": classification.accuracy,
             "dictionary_mcc": theirs.mcc, "uniqueness": theirs.uniqueness, "shrinkage": theirs.shrinkage,
             "l0": theirs.sae_l0, "dead_latents": theirs.dead_latents / 32}
    for key, value in pairs.items():
        assert mine[key] == pytest.approx(value, abs=2e-5), key
    assert 1 - mine["fvu"] == pytest.approx(theirs.explained_variance, abs=1e-5)


def test_a_suite_over_seeds_with_saelens_beside_ours(tmp_path):
    recipe = yaml.safe_load(recipe_file(tmp_path).read_text())
    suite = {"title": "tiny", "seeds": [1, 2], "base": recipe,
             "runs": [{"name": "topk", "label": "top-k", "published": {"f1": 0.5}, "curve": "top-k"},
                      {"name": "fista", "label": "FISTA on top-k's decoder",
                       "recipe": {"setting": "known_dictionary", "dictionary": {"pretrained": "run:topk"},
                                  "encoder": {"name": "fista", "steps": 20, "k": 3}}},
                      {"name": "theirs", "label": "SAELens BatchTopK", "saelens": {"architecture": "batchtopk", "k": 3}},
                      {"name": "iht", "label": "IHT on SAELens's",
                       "recipe": {"setting": "known_dictionary", "dictionary": {"pretrained": "run:theirs/saelens"},
                                  "encoder": {"name": "iht", "steps": 5,
                                              "warm_start": {"pretrained": "run:theirs/saelens"}}}},
                      {"name": "l1", "label": "L1 SAE, target L0 1.5",
                       "recipe": {"encoder": {"name": "linear", "subtract_decoder_bias": True},
                                  "model": {"l1_coeff": 1.0, "target_l0": 1.5}}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out, rows = run_suite(path, out_dir=tmp_path / "out", progress=False)
    with open(out / "comparison_seeds.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert [(r["name"], r["seed"]) for r in per_seed] == [(name, seed) for seed in "12"
                                                         for name in ("topk", "fista", "theirs", "iht", "l1")]
    fista_seed2 = yaml.safe_load((out / "fista" / "seed2" / "config.yaml").read_text())
    assert fista_seed2["dictionary"]["pretrained"] == str(out / "topk" / "seed2")  # run:NAME: the same seed's run
    iht_seed1 = yaml.safe_load((out / "iht" / "seed1" / "config.yaml").read_text())
    assert iht_seed1["dictionary"]["pretrained"] == str(out / "theirs" / "seed1" / "saelens")  # run:NAME/PATH
    by_name = {r["name"]: r for r in rows}
    assert by_name["iht"]["dictionary_mcc"] == pytest.approx(by_name["theirs"]["dictionary_mcc"])  # the same decoder
    f1s = [float(r["latent_f1"]) for r in per_seed if r["name"] == "topk"]
    assert by_name["topk"]["latent_f1"] == pytest.approx(sum(f1s) / 2)
    assert by_name["topk"]["latent_f1_sd"] == pytest.approx(abs(f1s[0] - f1s[1]) / 2 ** 0.5)
    assert by_name["theirs"]["peer"] and not by_name["topk"]["peer"]
    assert by_name["topk"]["curve"] == "top-k" and "curve" not in by_name["theirs"]
    assert by_name["theirs"]["ve"] == pytest.approx(1 - by_name["theirs"]["fvu"])
    assert by_name["l1"]["l0"] == pytest.approx(1.5, rel=0.15) and "l0_controller" in by_name["l1"]
    assert "l0_controller" not in by_name["topk"]  # only a run that targets an L0 has one
    report = (out / "report.md").read_text()
    assert "| top-k " in report and "published f1" in report and "SAELens BatchTopK" in report
    assert "L0 before the final shift" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000
    if abs(by_name["topk"]["l0"] - by_name["theirs"]["l0"]) <= 0.1 * by_name["theirs"]["l0"]:
        assert "Ratio, ours / SAELens's: F1" in report


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "recipes"
                                                            / "synthsaebench").glob("*.yaml")))
@pytest.mark.parametrize("quick", [False, True])
def test_the_synthsaebench_suites_check_out(recipe, quick, tmp_path):
    """Every run of the shipped suites (and their quick presets) resolves and passes the recipe checks, run:NAME
    references included, without training or drawing anything."""
    from sae_zoo.recipe import apply_quick, read_recipe_file
    from sae_zoo.suite import suite_jobs

    path = Path(__file__).resolve().parents[1] / "recipes" / "synthsaebench" / recipe
    content = read_recipe_file(path)
    if quick and "quick" not in content:
        pytest.skip(f"{recipe} has no quick preset")
    content = apply_quick(content, quick, str(path))
    jobs = suite_jobs(content, str(path), tmp_path / "out")
    assert len(jobs) == len(content["runs"]) * len(content.get("seeds", [None]))
    names = [spec["name"] for spec, _, _ in jobs]
    assert any(name.startswith("saelens_") for name in names)
    for spec, cfg, _ in jobs:
        if spec["name"].startswith("iht_on_saelens"):
            assert cfg.dictionary.pretrained == str(tmp_path / "out" / spec["recipe"]["dictionary"]["pretrained"]
                                                    .split(":")[1].split("/")[0] / f"seed{cfg.seed}" / "saelens")


def test_a_model_the_hub_cannot_serve_is_named_and_a_bug_stays_itself(monkeypatch):
    from sae_zoo.data.synthsaebench import load_model

    def offline(source, device="cpu"):
        raise OSError("offline")

    monkeypatch.setattr(SyntheticModel, "load_from_source", offline)
    with pytest.raises(ValueError, match=r"data.model: 'someone/model' is neither a folder nor .* \(OSError: offline\)") \
            as raised:
        load_model("someone/model")
    assert isinstance(raised.value.__cause__, OSError)  # the Hub's own error, kept for a traceback

    def buggy(source, device="cpu"):
        raise AttributeError("a bug")

    monkeypatch.setattr(SyntheticModel, "load_from_source", buggy)
    with pytest.raises(AttributeError, match="a bug"):
        load_model("someone/model")


def test_saelens_trains_with_the_recipes_defaults_as_our_runs_do(tmp_path, monkeypatch):
    """A recipe that gives no learning rate gives SAELens's run the one sae_zoo's run of it takes (its head's
    default, else SparseCoder's), not SAELens's own, and one that gives no step count is refused by name: a
    comparison must not differ silently."""
    import sae_lens.synthetic

    from sae_zoo.peers import DEFAULT_LR, fit_saelens

    given = {}

    class Stop(Exception):
        pass

    def runner_config(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(sae_lens.synthetic, "SyntheticSAERunnerConfig", runner_config)
    for encoder, lr in (({"name": "linear"}, DEFAULT_LR), ({"name": "topk", "k": 3}, 3e-3)):
        cfg = load_recipe(recipe_file(tmp_path, model={"l1_coeff": 0.0, "code_recovery": False}, encoder=encoder),
                          [f"run_dir={tmp_path / encoder['name']}"])
        with pytest.raises(Stop):
            fit_saelens(cfg, {"architecture": "batchtopk", "k": 3})
        assert given["lr"] == lr == plan(cfg).model_kwargs.get("lr", DEFAULT_LR)
    assert DEFAULT_LR == 1e-3 and given["training_samples"] == 40 * 256  # the recipe's 40 steps of 256
    cfg = load_recipe(recipe_file(tmp_path, trainer={"enable_progress_bar": False}), [f"run_dir={tmp_path / 'run2'}"])
    with pytest.raises(RecipeError, match="a SAELens run trains for trainer.max_steps steps"):
        fit_saelens(cfg, {"architecture": "batchtopk", "k": 3})


def test_saelens_trains_on_the_papers_synthetic_data(tmp_path):
    """The paper's data come as full-batch ``(x, true_codes)`` batches: SAELens's trainer takes their inputs, and
    its SAE is scored as ours are."""
    from sae_zoo.peers import fit_saelens

    cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "synthetic" / "unknown.yaml",
                      ["data.n_train=256", "data.n_test=128", "trainer.max_steps=30", f"run_dir={tmp_path / 'run'}",
                       "dictionary.n_latents=16"])
    run_dir, metrics = fit_saelens(cfg, {"architecture": "topk", "k": 3})
    assert metrics["steps"] == 30 and metrics["encoder"] == "saelens:topk"
    assert metrics["test"]["l0"] == pytest.approx(3.0) and 0 < metrics["test"]["mcc"] < 1
    assert (run_dir / "saelens" / "cfg.json").exists()


def test_saelens_runs_refuse_a_transcoders_recipe_by_name(tmp_path):
    from sae_zoo.peers import fit_saelens

    cfg = load_recipe(None, ["setting=unknown", "data.name=activations", "data.model=some/lm", "data.hook=mlp_in.1",
                             "data.hook_out=mlp_out.1", "dictionary.n_latents=32", "trainer.max_steps=10",
                             f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(RecipeError, match="SAELens's trainer trains an SAE on one stream of activations"):
        fit_saelens(cfg, {"architecture": "batchtopk", "k": 3})


@pytest.mark.parametrize("stream", [False, True])
def test_reading_a_start_sample_leaves_the_passes_as_they_were(tmp_path, stream):
    """The cached samples' shuffle and the stream's draws are seeded by the pass: a start that reads training rows
    (a decoder-bias start) must not use up a pass, so that the run sees the batches an otherwise equal run sees."""
    import lightning as L

    from sae_zoo import Dictionary, create_encoder

    def batches_seen(**options):
        dm = tiny_data(tmp_path, n_train=1024, stream=stream)
        torch.manual_seed(0)
        model = SparseCoder(create_encoder("topk", d_model=16, n_latents=32, k=3), Dictionary(32, 16, bias=True),
                            code_recovery=False, bias_init_samples=256, **options)
        seen = []

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(batch[:, 0].clone())

        L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", limit_val_batches=0, callbacks=[Record()]).fit(model, dm)
        return torch.cat(seen)

    plain = batches_seen()
    assert len(plain) == 6 * 256 and not torch.equal(plain[:1024], plain[512:1536])
    assert torch.equal(batches_seen(decoder_bias_init="mean"), plain)
