"""Two CPU processes (Lightning DDP, gloo backend) train exactly what one process trains with the same
global batch: each rank runs the LM on half of the contexts, read on the fly, and every rank serves its slice of the
batches one process would serve; gradients are averaged, the decoder is renormalised on every rank, and the test
metrics (torchmetrics states) are synced."""

import csv
import json
import subprocess
import sys

import os
from pathlib import Path

import pytest
import torch
import yaml
from lm_fixtures import write_corpus, write_tiny_llama

SAE_ZOO = [sys.executable, "-m", "sae_zoo.cli"]
HOOKS = str(Path(__file__).with_name("run_hooks.py"))


@pytest.mark.parametrize("cache", [False, True], ids=["on_the_fly", "cache"])
def test_two_gloo_processes_equal_one_process(tmp_path, cache):
    """A Matryoshka BatchTopK SAE with AuxK and resampling, trained at 1.5k: the batch-wide top-k, the threshold
    estimate, the dead-latent counts and the resampling draw are the global batch's on every rank. Each rank runs
    the LM on half of the training contexts: read on the fly, or written to the cache (each rank its shards)."""
    model, files = write_tiny_llama(tmp_path / "model"), write_corpus(tmp_path / "text")
    recipe = {"setting": "unknown", "imports": [HOOKS],
              "data": {"name": "activations", "model": model, "hook": "resid_post.1", "data_files": files,
                       "context_len": 16, "n_train_tokens": 1500, "n_test_tokens": 300, "test_stride": 4, "shard_tokens": 400,
                       "batch_size": 100, "model_batch_size": 8, "cache_dir": str(tmp_path / "cache"),
                       "ce_contexts": 8, "shuffle_buffer": 600, "cache": cache},
              "dictionary": {"n_latents": 32},
              "encoder": {"name": "batchtopk", "k": 2, "k_train_factor": 1.5, "threshold_lr": 0.2},
              "model": {"matryoshka_widths": [8, 32], "auxk_coeff": 0.05, "auxk_k": 4, "dead_tokens": 300,
                        "resample_every": 10},
              "trainer": {"max_steps": 40, "accelerator": "cpu", "limit_val_batches": 0, "log_every_n_steps": 5}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # the two-process run takes the default folder, whose name holds the start time: the ranks agree on it
    for name, extra in (("one", ["run_dir=one"]), ("two", ["trainer.devices=2", "trainer.strategy=ddp"])):
        (tmp_path / f"counts-{name}").mkdir()
        done = subprocess.run([*SAE_ZOO, "fit", "recipe.yaml", "--no-progress", *extra, f"data.cache_dir=cache-{name}"],
                              cwd=tmp_path, timeout=600, capture_output=True, text=True,
                              env={**os.environ, "SAE_ZOO_TEST_COUNTS": str(tmp_path / f"counts-{name}")})
        # on failure, say how and show what the run printed (a flake under load died with SIGKILL, silently)
        assert done.returncode == 0, (f"the {name}-process run exited with {done.returncode}:\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    # every rank ran the LM, on half of the training contexts each (a third pass over them ends at step 40)
    counts = {name: [json.loads((tmp_path / f"counts-{name}" / f"rank-{r}.json").read_text())
                     for r in range(len(list((tmp_path / f"counts-{name}").iterdir())))] for name in ("one", "two")}
    assert len(counts["one"]) == 1 and len(counts["two"]) == 2
    if cache:  # 100 training contexts in 4 shards of 26, 26, 26 and 22: the ranks write shards 0, 2 and 1, 3
        assert counts["one"][0]["cached_contexts"] == 100 and counts["one"][0]["contexts"] == 0
        assert [c["cached_contexts"] for c in counts["two"]] == [52, 48]
    else:
        assert counts["one"][0]["contexts"] == 300  # 100 training contexts a pass, three passes
        assert [c["contexts"] for c in counts["two"]] == [150, 150]
        assert [c["passes"] for c in counts["two"]] == [21, 21] and counts["one"][0]["passes"] == 39  # 8 a pass
    (two_dir,) = (tmp_path / "runs" / "recipe").iterdir()  # one folder, written by rank zero alone
    two_dir.rename(tmp_path / "two")
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert (one["devices"], two["devices"]) == (1, 2) and one["steps"] == two["steps"] == 40
    for key, value in one["test"].items():
        if key.startswith("ce_loss_recovered"):  # a random LM's zero-ablation gap is tiny: the ratio magnifies 1e-7s
            continue
        assert abs(two["test"][key] - value) <= 1e-5 * max(1.0, abs(value)), key
    checkpoints = [torch.load(tmp_path / n / "model.ckpt", weights_only=False) for n in ("one", "two")]
    for key in checkpoints[0]["state_dict"]:  # the weights, and the threshold estimate beside them
        torch.testing.assert_close(checkpoints[1]["state_dict"][key], checkpoints[0]["state_dict"][key],
                                   atol=1e-6, rtol=1e-5, msg=key)
    assert checkpoints[0]["state_dict"]["encoder.threshold"] > 0
    dead_counts = [c["training_aids"]["dead_latents"]["state"]["tokens_since_fired"] for c in checkpoints]
    torch.testing.assert_close(dead_counts[1], dead_counts[0])
    # latents died (so AuxK and the resampling had work) and the counts are tokens of the global batch
    with open(tmp_path / "one" / "logs" / "metrics.csv") as f:
        assert max(float(row["train/dead_fraction"]) for row in csv.DictReader(f) if row["train/dead_fraction"]) > 0
    assert (dead_counts[0] % 100 == 0).all()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["config.yaml", "logs", "metrics.json", "model.ckpt"]
    assert one["test"]["fvu"] < 0.9  # and the single run really trained
