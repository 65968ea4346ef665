"""``benchmarks/gpu.sh --dry-run``: every GPU check's steps on the CPU at tiny sizes, so that the script a GPU
machine runs once cannot rot between runs."""

import json
import os
import subprocess
from pathlib import Path

from lm_fixtures import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    lm = write_tiny_llama(tmp_path / "lm", layers=9)  # the transcoder suite's runs read block 8
    # started as a user starts it, after `make test`: the script finds the project's .venv itself
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(out), "--lm-model", lm], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert {k: v for k, v in status.items() if k != "seconds"} == {"throughput": 0, "clt_layers": 0, "bench16k": 0,
                                                                  "smollm2": 0, "transcoders": 0, "pipeline": 0}
    clt = (out / "clt_layers.log").read_text()
    assert all(f"| {n} | {model} |" in clt for n in (1, 2) for model in ("CLT", "per-layer set"))
    throughput = (out / "throughput.log").read_text()
    for head in ("linear SAE", "top-k SAE (k=4)", "BatchTopK SAE (k=4)", "MLP head"):
        assert head in throughput
    bench = json.loads((out / "bench16k.json").read_text())
    assert set(bench) == {"batchtopk", "ours"}
    for row in bench.values():
        assert row["samples"] == row["steps"] * 256 > 0 and 0 < row["f1"] < 1 and 0 < row["l0"] <= 8
    assert "| sae_zoo Matryoshka BatchTopK (k=4), defaults | 2,560 |" in (out / "bench16k.md").read_text()
    suite = (out / "smollm2" / "comparison.csv").read_text().splitlines()
    assert len(suite) > 5 and suite[0].count(",") > 3
    transcoders = (out / "transcoders" / "comparison.csv").read_text().splitlines()
    assert len(transcoders) == 4 and "skip-transcoder" in transcoders[3]
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert set(pipeline["results"]) == {"bare", "live", "cache", "hooks", "live_long", "bare_again"}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in pipeline["results"].values())
    assert pipeline["results"]["hooks"]["hooks"] == 3 and len(pipeline["ratios"]) == 4


def test_the_gpu_script_refuses_a_step_it_does_not_have(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(tmp_path), "--steps", "pipeline,bench"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and ("--steps: no step named bench; the steps are throughput, clt_layers, bench16k"
                                     in done.stderr)
    assert not (tmp_path / "status.json").exists()
