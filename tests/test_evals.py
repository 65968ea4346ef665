"""``sae-zoo evaluate``: named evals of a run folder or a saved SAE, written as evaluation.json and a report."""

import json
from pathlib import Path

import pytest
from lm_fixtures import sae_recipe

from sae_zoo.cli import main
from sae_zoo.evals import parse_evals
from sae_zoo.hub import load_run
from sae_zoo.recipe import fit, recipe_from_content


@pytest.fixture(scope="module")
def run_dir(lm_files, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evals")
    model_dir, files = lm_files
    cfg = recipe_from_content(sae_recipe(model_dir, files, tmp_path))
    return fit(cfg, progress=False)[0]


def test_a_run_is_evaluated_on_its_own_data_into_its_folder(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--evals", "core", "--no-progress"]) == 0
    record = json.loads((run_dir / "evaluation.json").read_text())
    core = record["figures"]["core"]
    trained = json.loads((run_dir / "metrics.json").read_text())["test"]
    # the same held-out tokens and contexts as the run's own test: the same figures
    for key in ("fvu", "fvu_se", "l0", "ce_loss_recovered"):
        assert core[key] == pytest.approx(trained[key], rel=1e-6), key
    assert {"kl_div_score", "kl_div_score_se", "cossim", "l2_ratio", "relative_reconstruction_bias"} <= set(core)
    assert record["evals"] == ["core"] and record["every_position"] is False and record["seconds"]["core"] >= 0
    report = (run_dir / "evaluation.md").read_text()
    assert "| KL score |" in report and f"{core['fvu']:.4f} ± {core['fvu_se']:.4f}" in report
    assert "evaluation.md" in capsys.readouterr().out


def test_a_saved_sae_needs_an_output_folder_and_every_position_is_saebenchs(run_dir, tmp_path):
    model = load_run(run_dir)[0]
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="is not a sae_zoo run folder: give --out DIR"):
        from sae_zoo.evals import evaluate_source
        evaluate_source(tmp_path / "saved")
    recipe = json.loads(json.dumps(load_run(run_dir)[1]["data"]))
    overrides = [f"data.{k}={v}" for k, v in recipe.items() if k in ("data_files", "context_len", "n_train_tokens",
                                                                    "n_test_tokens", "test_stride", "shard_tokens",
                                                                    "cache_dir", "ce_contexts", "model_batch_size")]
    assert main(["evaluate", str(tmp_path / "saved"), "--out", str(tmp_path / "out"), "--every-position",
                 "--model", recipe["model"], "--hook", "resid_post.1", "--no-progress", *overrides]) == 0
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["every_position"] is True and record["figures"]["core"]["ce_every_position"] is True
    assert "every position spliced" in (tmp_path / "out" / "evaluation.md").read_text()


def test_an_unknown_eval_is_named_before_anything_is_loaded(capsys):
    with pytest.raises(ValueError, match="--evals: .absorb.; the evals are absorption, autointerp, core, probing"):
        parse_evals("core,absorb")
    assert main(["evaluate", "no/such/source", "--evals", "nope"]) == 2
    assert "--evals: 'nope'" in capsys.readouterr().err


def test_autointerp_runs_behind_its_gate_and_a_failed_gate_prints_no_score(run_dir, tmp_path):
    import re

    from sae_zoo.evals import EvalSettings, autointerp_report, evaluate_source
    from sae_zoo.evaluation.autointerp import AutointerpSettings
    from sae_zoo.evaluation.judges import ScriptedJudge

    asked = []

    def says_yes(chat):
        asked.append(chat)
        user = chat[-1]["content"]
        return "a word" if "what does the feature detect" in user else str([1] * len(re.findall(r"Example \d+:", user)))

    settings = EvalSettings(judge=ScriptedJudge(says_yes, "yes-sayer"), context_len=8,
                            autointerp=AutointerpSettings(n_latents=3, n_quantiles=2, n_train=4, n_test=2,
                                                          n_not_active=4, gate_latents=3))
    out = evaluate_source(run_dir, "autointerp", tmp_path / "out", settings, progress=False)
    figures = json.loads((out / "evaluation.json").read_text())["figures"]["autointerp"]
    assert figures["autointerp_judge"] == "yes-sayer" and figures["autointerp_latents"] == 3
    # a judge that says yes to everything is at chance on the gate: it fails it, and its score is not a result
    assert figures["gate_true"] == 0.5 and figures["gate_passed"] is False and not figures["autointerp_informative"]
    assert figures["autointerp_detection"] == 0.5 and len(figures["autointerp_per_latent"]) == 3
    assert all(r["explanation"] == "a word" for r in figures["autointerp_per_latent"])
    report = (out / "evaluation.md").read_text()
    assert "FAILED" in report and "uninformative" in report and "| detection" not in report
    passed = {**figures, "gate_passed": True, "autointerp_informative": True}
    assert any(line.startswith("| detection (balanced accuracy, 3 latents) | 0.500 ±")
               for line in autointerp_report(passed))
    assert len(asked) > 3


def test_absorption_refuses_a_vocabulary_without_words_for_every_letter(run_dir, capsys):
    """The tiny LM's few dozen words leave most letters without a probe: named, before any probe is trained."""
    assert main(["evaluate", str(run_dir), "--evals", "absorption", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "absorption: too few words for the letter probe of" in err and "q (0 train, 0 test)" in err


def test_a_suites_runs_on_one_decoder_share_autointerp_latents(tmp_path, monkeypatch):
    """Runs on one decoder (the SAE and heads on its frozen decoder) are scored on the latents drawn for the first
    of them; a run with its own decoder draws its own; a peer library's run is listed, not evaluated."""
    import sae_zoo.suite as suite
    from sae_zoo.evals import EvalSettings

    seen = []

    def fake_evaluate(run_dir, evals, settings, progress):
        seen.append((Path(run_dir).name, settings.latents))
        drawn = settings.latents or {"sae": [1, 2], "other": [7, 8]}[Path(run_dir).name]
        figures = {"autointerp": {"autointerp_per_latent": [{"latent": i} for i in drawn], "autointerp_informative":
                                  True, "autointerp_detection": 0.5, "autointerp_fuzzing": 0.5}}
        (Path(run_dir) / "evaluation.json").write_text(json.dumps({"figures": figures}))
        return Path(run_dir)

    monkeypatch.setattr(suite, "evaluate_source", fake_evaluate)
    names = ["sae", "mlp", "other", "peer"]
    for name in names:
        (tmp_path / name).mkdir()
    rows = [{"label": n, "run_dir": str(tmp_path / n), "peer": n == "peer"} for n in names]
    decoders = [str(tmp_path / "sae"), str(tmp_path / "sae"), str(tmp_path / "other"), str(tmp_path / "peer")]
    suite.evaluate_runs(tmp_path, rows, decoders, ("autointerp",), EvalSettings(), progress=False)
    assert seen == [("sae", None), ("mlp", [1, 2]), ("other", None)]
    table = (tmp_path / "evaluations.md").read_text()
    assert "| peer " in table and "not evaluated (a peer library's run)" in table
