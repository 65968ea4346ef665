"""sae-zoo upgrade on a tiny LM: an SAE's run or checkpoint, candidates on its frozen decoder, compared at its L0."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from lm_fixtures import write_corpus, write_tiny_llama

import sae_zoo.upgrade.sweep as upgrade_module
from sae_zoo import SparseCoder
from sae_zoo.cli import main
from sae_zoo.hub import export_saelens, load_run
from sae_zoo.recipe import fit, recipe_from_content
from sae_zoo.upgrade import UpgradeOptions, at_l0, stationary_l1, upgrade

OPTIONS = {"ratios": (0.7, 1.0, 1.4), "steps": 30, "solver_steps": 20, "hidden": 16, "lr": 1e-3}


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("upgrade")
    model, files = write_tiny_llama(root / "model"), write_corpus(root / "text")
    data = {"name": "activations", "model": model, "hook": "resid_post.1", "data_files": files, "context_len": 16,
            "n_train_tokens": 1500, "n_test_tokens": 300, "test_stride": 4, "shard_tokens": 400, "batch_size": 100,
            "model_batch_size": 8, "cache_dir": str(root / "cache"), "ce_contexts": 8, "shuffle_buffer": 600}
    recipe = {"setting": "unknown", "data": data, "dictionary": {"n_latents": 32, "bias": True},
              "encoder": {"name": "linear", "subtract_decoder_bias": True}, "model": {"l1_coeff": 0.1, "lr": 0.003},
              "trainer": {"max_steps": 60, "accelerator": "cpu"}, "run_dir": str(root / "sae")}
    run_dir, metrics = fit(recipe_from_content(recipe), progress=False)
    return run_dir, metrics, data


def read_points(out):
    with open(out / "comparison.csv") as f:
        return list(csv.DictReader(f))


def test_upgrade_a_run_measures_the_sae_sweeps_every_candidate_and_writes_the_comparison(sae_run, tmp_path, caplog,
                                                                                          hub):
    run_dir, metrics, _ = sae_run
    caplog.set_level(logging.INFO, logger="sae_zoo")
    out = upgrade(run_dir, tmp_path / "up", UpgradeOptions(**OPTIONS), progress=False)
    rows = read_points(out)
    assert len(rows) == 1 + 6 * 3 and rows[0]["candidate"] == "source"
    source = rows[0]
    # the SAE's own encoder, measured as its run measured it
    for key in ("fvu", "l0", "ce_loss_recovered"):
        assert float(source[key]) == pytest.approx(metrics["test"][key], rel=1e-5)
    l0 = float(source["l0"])
    for candidate in ("mp", "fista", "ito"):  # the iterative heads keep at most k = ratio x L0 codes
        for row in (r for r in rows if r["candidate"] == candidate):
            assert 0 < float(row["l0"]) <= round(float(row["ratio"]) * l0) + 1e-6
    for candidate in ("retrained", "residual_mlp", "mlp"):
        assert (out / "models" / f"{candidate}@1").is_dir()
        sweep = sorted(float(r["l0"]) for r in rows if r["candidate"] == candidate)
        assert sweep[0] < sweep[-1]  # the target L0 moved them apart
    assert float(next(r for r in rows if r["candidate"] == "mp")["inference_flops"]) > float(source["inference_flops"])
    report = (out / "comparison.md").read_text()
    assert f"at the SAE's own L0 ({l0:.1f})" in report
    assert "| residual MLP from the SAE encoder" in report and (out / "comparison.png").stat().st_size > 10_000
    # k-sparse probing of every point, the SAE's as its run measured it, and a table of it at the SAE's L0
    for key in ("probe_k1", "probe_k20", "probe_party_k5", "probe_dense"):
        assert float(source[key]) == pytest.approx(metrics["test"][key])
    assert all(0 <= float(r["probe_k5"]) <= 1 for r in rows)
    assert "## Sparse probing" in report and "| encoder" in report.split("## Sparse probing")[1]
    probing = report.split("## Sparse probing")[1]
    # every candidate read at the SAE's L0 has its gain at each k, with its paired standard error
    interpolated = probing.count(" interpolated |")
    assert interpolated >= 3 and probing.count(" ± ") == 1 + 4 * interpolated
    printed = caplog.text  # progress and the tables are logged: the command line shows them
    assert "At the SAE's L0" in printed and "FISTA from the SAE's codes" in printed
    # a model and card per candidate, at the point nearest the SAE's L0, ready for push
    card = (out / "cards" / "residual_mlp" / "README.md").read_text()
    assert f"upgrades the SAE `{run_dir}`" in card and "sae-upgrade" in card
    assert "5-sparse probing accuracy (mean over tasks)" in card
    model = SparseCoder.from_pretrained(out / "cards" / "residual_mlp")
    assert model.encoder.name == "residual_mlp"
    torch.testing.assert_close(model.dictionary.atoms, load_run(run_dir)[0].dictionary.atoms)
    assert main(["push", str(out / "cards" / "residual_mlp"), "sae-zoo-tester/upgraded-sae"]) == 0
    pulled = SparseCoder.from_pretrained("sae-zoo-tester/upgraded-sae")
    x = torch.randn(16, model.dictionary.d_model)
    torch.testing.assert_close(pulled.encode(x), model.encode(x), rtol=0, atol=0)
    from huggingface_hub import ModelCard
    pushed = ModelCard.load("sae-zoo-tester/upgraded-sae").text
    assert f"upgrades the SAE `{run_dir}`" in pushed and 'from_pretrained("sae-zoo-tester/upgraded-sae")' in pushed
    assert "<local directory>" in (out / "cards" / "residual_mlp" / "README.md").read_text()  # the folder is kept


def test_an_interrupted_upgrade_resumes_and_another_one_is_refused(sae_run, tmp_path, monkeypatch):
    run_dir, _, _ = sae_run
    options = UpgradeOptions(candidates=("residual_mlp", "mp"), **OPTIONS)
    out = upgrade(run_dir, tmp_path / "up", options, progress=False)
    before = read_points(out)
    (out / "points" / "mp@1.json").unlink()  # as if stopped before this point was measured
    measured = []
    real_measure = upgrade_module.measure
    monkeypatch.setattr(upgrade_module, "measure", lambda model, *a: measured.append(model) or real_measure(model, *a))
    monkeypatch.setattr(upgrade_module.HeadBank, "training_step", lambda *a: pytest.fail("trained again"))
    upgrade(run_dir, out, options, progress=False)
    assert len(measured) == 1 and measured[0].encoder.name == "mp"
    assert read_points(out) == [{**r, "seconds": a["seconds"]} for r, a in zip(before, read_points(out))]
    with pytest.raises(ValueError, match=r"holds another upgrade \(it differs in ratios, steps\)"):
        upgrade(run_dir, out, UpgradeOptions(candidates=("residual_mlp", "mp"), **{**OPTIONS, "steps": 5,
                                                                                    "ratios": (1.0,)}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no upgrade.json"):
        upgrade(run_dir, tmp_path / "full", options)


def test_a_checkpoint_takes_its_lm_and_hook_from_its_metadata_and_bad_ones_are_named(sae_run, tmp_path, capsys):
    run_dir, _, data = sae_run
    model = load_run(run_dir)[0]
    overrides = [f"data.{k}={v}" for k, v in data.items() if k not in ("name", "model", "hook", "cache_dir")]
    # the run scaled its inputs to mean norm sqrt(d); its SAELens export records no normalisation, so say it
    overrides += [f"data.cache_dir={tmp_path / 'cache'}", "data.normalize=true"]
    good = export_saelens(model, tmp_path / "good", model_name=data["model"], hook_name="blocks.1.hook_resid_post")
    out = upgrade(good, tmp_path / "up", UpgradeOptions(candidates=("mp",), data=tuple(overrides), **OPTIONS),
                  progress=False)
    identity = json.loads((out / "upgrade.json").read_text())["identity"]
    assert identity["data"]["model"] == data["model"] and identity["data"]["hook"] == "blocks.1.hook_resid_post"
    assert identity["data"]["normalize"] is True  # the override, over normalize_activations: none

    nameless = export_saelens(model, tmp_path / "nameless", hook_name="resid_post.1")
    cfg = json.loads((nameless / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = None
    (nameless / "cfg.json").write_text(json.dumps(cfg))
    wrong_hook = export_saelens(model, tmp_path / "hook", model_name=data["model"],
                                hook_name="blocks.7.hook_resid_post")
    overrides[-2] = f"data.cache_dir={tmp_path / 'other-cache'}"
    for source, message in ((nameless, "names no language model .* pass --model"),
                            (wrong_hook, "reads hook 'blocks.7.hook_resid_post', which .* does not have .* --hook")):
        with pytest.raises(ValueError, match=message):
            upgrade(source, tmp_path / "x", UpgradeOptions(data=tuple(overrides)))
    narrow = SparseCoder(model.encoder.__class__(8, 32, subtract_decoder_bias=True),
                         type(model.dictionary)(32, 8, bias=True))
    export_saelens(narrow, tmp_path / "narrow", model_name=data["model"], hook_name="resid_post.1")
    with pytest.raises(ValueError, match=r"reads vectors of width 8, but .* has width 16 at hook 'resid_post.1'"):
        upgrade(tmp_path / "narrow", tmp_path / "x", UpgradeOptions(data=tuple(overrides)))
    assert not (tmp_path / "x").exists()  # nothing written before the checks pass
    assert main(["upgrade", "gemma-scope-2b-pt-re/layer_12/width_16k/average_l0_82"]) == 2
    assert "catalogue releases close to it: gemma-scope-2b-pt-res" in capsys.readouterr().err


def test_values_at_the_sae_l0_are_interpolated_in_log_l0_and_never_extrapolated():
    points = [{"l0": 10.0, "fvu": 0.5}, {"l0": 40.0, "fvu": 0.3}]
    assert at_l0(points, 20.0, "fvu") == pytest.approx(0.4)  # halfway in log L0
    assert at_l0(points, 10.1, "fvu") == 0.5
    assert at_l0(points, 50.0, "fvu") is None and at_l0(points, 5.0, "fvu") is None


def test_the_l1_coefficient_at_which_codes_are_optimal():
    from sae_zoo import Dictionary, create_encoder

    torch.manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(12, 6), dim=-1)
    x = torch.relu(torch.randn(256, 12) - 1) @ atoms
    fista = create_encoder("fista", d_model=6, n_latents=12, steps=3000, l1_coeff=0.3).eval()
    model = SparseCoder(fista, Dictionary.from_tensor(atoms, trainable=False))
    assert stationary_l1(model, x) == pytest.approx(0.3, rel=0.02)  # FISTA's solutions are optimal at its l1


def test_gains_have_paired_standard_errors():
    from sae_zoo.evaluation import CELosses, ContextSums, Evaluation, TokenSums
    from sae_zoo.evaluation.bootstrap import bootstrap_se
    from sae_zoo.upgrade.report import gain_standard_errors

    g = torch.Generator().manual_seed(0)
    c = 20
    clean = ContextSums(torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.full((c,), 10.0, dtype=torch.float64),
                        torch.rand(c, generator=g, dtype=torch.float64) + 5, torch.randn(c, 4, generator=g, dtype=torch.float64))
    ce = CELosses(torch.full((8,), 4.0, dtype=torch.float64), torch.rand(8, generator=g, dtype=torch.float64) + 9,
                  torch.rand(8, generator=g, dtype=torch.float64) + 5)
    source = Evaluation({}, TokenSums(clean, clean), ce)
    fewer_errors = ContextSums(0.9 * clean.sse, clean.tokens, clean.sum_sq, clean.sum_x)
    better = Evaluation({}, TokenSums(fewer_errors, fewer_errors), ce)
    se = gain_standard_errors(source, [(better, 1.0)])
    # 10% less squared error in every context: the gain is 0.1 x the SAE's FVU in every resample
    assert se["fvu"] == pytest.approx(0.1 * bootstrap_se(clean.fvu, c), rel=1e-9)
    assert se["ce_loss_recovered"] == 0  # the same spliced losses: no gain in any resample
    # a mix of two points, as at an interpolated L0, is the mix of their resampled values
    half = gain_standard_errors(source, [(better, 0.5), (source, 0.5)])["fvu"]
    assert half == pytest.approx(se["fvu"] / 2, rel=1e-9)
    # an evaluation read back from its saved state gives the same figures
    again = Evaluation.from_state(source.state())
    assert gain_standard_errors(again, [(better, 1.0)]) == se


def test_each_candidate_sweeps_the_knob_its_kind_has():
    from sae_zoo import create_encoder
    from sae_zoo.upgrade import CANDIDATES, Start
    from sae_zoo.upgrade.candidates import check_candidates

    def build(name, ratio, head, l0, **options):
        return CANDIDATES[name].build(Start(head, l0, 0.3, UpgradeOptions(**options)), ratio)

    topk = create_encoder("topk", d_model=8, n_latents=24, k=4, subtract_decoder_bias=True)
    head, kwargs, knob = build("residual_mlp", 1.5, topk, 4.0, hidden=8)
    assert (head.k, head.config()["k"], kwargs, knob) == (6, 6, {"l1_coeff": 0.0, "lr": 1e-3}, "k=6")
    head, _, _ = build("retrained", 0.5, topk, 4.0)
    assert head.k == head.config()["k"] == 2 and topk.k == 4  # a copy with its own k, kept when it is saved
    torch.testing.assert_close(head.linear.weight, topk.linear.weight)
    linear = create_encoder("linear", d_model=8, n_latents=24, subtract_decoder_bias=True)
    _, kwargs, knob = build("retrained", 0.5, linear, 30.0)
    assert kwargs == {"l1_coeff": 0.3, "lr": 1e-3, "target_l0": 15.0} and knob == "target L0 15.0"
    fista, kwargs, knob = build("fista", 0.5, linear, 30.0, solver_steps=7)
    assert (fista.k, fista.steps, fista.l1_coeff, kwargs, knob) == (15, 7, 0.3, {}, "k=15")
    assert torch.equal(fista.warm_start.linear.weight, linear.linear.weight) and not fista.warm_start.training
    batchtopk = create_encoder("batchtopk", d_model=8, n_latents=24, k=4, subtract_decoder_bias=True)
    head, kwargs, knob = build("residual_mlp", 2.0, batchtopk, 4.0, hidden=8)
    assert head.threshold is not None and kwargs["target_l0"] == 8.0 and knob == "target L0 8.0"
    head, kwargs, knob = build("retrained", 2.0, batchtopk, 4.0)
    assert head.config()["k"] == 8 and knob == "k=8"

    with pytest.raises(ValueError, match="a 'mlp' head; the residual MLP starts from a linear, topk, jumprelu"):
        check_candidates("s", create_encoder("mlp", d_model=8, n_latents=24, hidden=4), ("residual_mlp",))
    with pytest.raises(ValueError, match="'mp' encoder has no weights to train further"):
        check_candidates("s", create_encoder("mp", d_model=8, n_latents=24, k=3), ("retrained", "fista"))
    with pytest.raises(ValueError, match="candidates: lasso; choose from retrained, residual_mlp"):
        UpgradeOptions(candidates=("lasso",))


def test_a_new_candidate_is_one_registered_object(sae_run, tmp_path):
    """CONTRIBUTING.md's candidate, run as written: registered, it is swept, reported and carded beside the
    built-in ones, with no other file touched."""
    import re
    from pathlib import Path

    from sae_zoo.upgrade import CANDIDATES

    guide = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    block = re.search(r"## An upgrade candidate.*?```python\n(.*?)```", guide, re.S).group(1)
    run_dir, _, _ = sae_run
    try:
        exec(compile(block, "contributed_candidate.py", "exec"), {})
        assert CANDIDATES["lca"].label == "LCA from the SAE's codes" and not CANDIDATES["lca"].trains
        out = upgrade(run_dir, tmp_path / "up", UpgradeOptions(**{**OPTIONS, "candidates": ("lca", "mp")}),
                      progress=False)
    finally:
        CANDIDATES.pop("lca", None)
    rows = read_points(out)
    l0 = float(rows[0]["l0"])
    lca = [r for r in rows if r["candidate"] == "lca"]
    assert [float(r["ratio"]) for r in lca] == list(OPTIONS["ratios"])
    assert all(0 < float(r["l0"]) <= round(float(r["ratio"]) * l0) for r in lca)
    assert "| LCA from the SAE's codes" in (out / "comparison.md").read_text()
    card = SparseCoder.from_pretrained(out / "cards" / "lca")
    assert card.encoder.name == "lca"


@pytest.fixture(scope="module")
def transcoder_run(sae_run, tmp_path_factory):
    """A skip-transcoder of block 1's MLP, on the same tiny LM and text."""
    _, _, data = sae_run
    root = tmp_path_factory.mktemp("transcoder")
    data = {**data, "hook": "mlp_in.1", "hook_out": "mlp_out.1", "cache_dir": str(root / "cache")}
    recipe = {"setting": "unknown", "data": data, "dictionary": {"n_latents": 32, "bias": True},
              "encoder": {"name": "linear"}, "model": {"l1_coeff": 0.1, "lr": 0.003, "skip_connection": True},
              "trainer": {"max_steps": 60, "accelerator": "cpu"}, "probing": {"enabled": False},
              "run_dir": str(root / "tc")}
    run_dir, metrics = fit(recipe_from_content(recipe), progress=False)
    return run_dir, metrics


def test_a_transcoder_upgrades_with_amortised_candidates_on_its_frozen_decoder_and_skip(transcoder_run, tmp_path):
    run_dir, metrics = transcoder_run
    out = upgrade(run_dir, tmp_path / "up", UpgradeOptions(**OPTIONS, probing=False), progress=False)
    rows = read_points(out)
    assert [r["candidate"] for r in rows] == ["source"] + ["retrained"] * 3 + ["residual_mlp"] * 3 + ["mlp"] * 3
    for key in ("fvu", "l0", "ce_loss_recovered"):  # the transcoder scored as its run scored it: on its targets
        assert float(rows[0][key]) == pytest.approx(metrics["test"][key], rel=1e-5)
    trained = load_run(run_dir)[0]
    for name in ("retrained@1", "residual_mlp@1"):
        model = SparseCoder.from_pretrained(out / "models" / name)
        assert model.transcoder and not model.skip.weight.requires_grad
        torch.testing.assert_close(model.skip.weight, trained.skip.weight)  # the skip term stays the transcoder's
        torch.testing.assert_close(model.dictionary.atoms, trained.dictionary.atoms)
    with pytest.raises(ValueError, match=r"is a transcoder: the candidate 'fista' finds codes by reconstructing its "
                                         r"input through the decoder"):
        upgrade(run_dir, tmp_path / "fista", UpgradeOptions(candidates=("fista",), **OPTIONS), progress=False)


def test_a_transcoder_checkpoint_without_its_target_hook_is_refused(transcoder_run, tmp_path):
    run_dir, _ = transcoder_run
    out = export_saelens(load_run(run_dir)[0], tmp_path / "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name_out"] == "mlp_out.1"
    del cfg["metadata"]["hook_name_out"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"is a transcoder: scored on its input hook alone, its output would be "
                                         r"compared with its input.*pass --hook-out"):
        upgrade(out, tmp_path / "up", UpgradeOptions(**OPTIONS), progress=False)


def test_a_top_k_sweep_never_computes_the_l1_coefficient():
    """A top-k head's candidates sweep k, so the L1 coefficient (which a skip-transcoder's codes need not give) is
    left uncomputed; a candidate that tunes one computes it once."""
    from sae_zoo import create_encoder
    from sae_zoo.upgrade import CANDIDATES, Start

    topk = create_encoder("topk", d_model=8, n_latents=24, k=4)
    start = Start(topk, 4.0, lambda: pytest.fail("the L1 coefficient was computed"), UpgradeOptions(hidden=8))
    for name in ("retrained", "residual_mlp"):
        assert CANDIDATES[name].build(start, 1.0).model_kwargs["l1_coeff"] == 0.0
    calls = []
    linear = Start(create_encoder("linear", d_model=8, n_latents=24), 4.0, lambda: calls.append(1) or 0.25,
                   UpgradeOptions(hidden=8))
    for ratio in (0.7, 1.0):
        assert CANDIDATES["retrained"].build(linear, ratio).model_kwargs["l1_coeff"] == 0.25
    assert calls == [1]
