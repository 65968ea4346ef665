"""A head written outside the package, exactly as CONTRIBUTING.md shows, trains through a recipe by name."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from sae_zoo import Dictionary, SparseCoder
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.metrics import functional

ROOT = Path(__file__).resolve().parents[1]


def contributed_head(tmp_path: Path) -> Path:
    code = re.search(r"```python\n(.*?)```", (ROOT / "CONTRIBUTING.md").read_text(), re.S).group(1)
    path = tmp_path / "tied_head.py"
    path.write_text(code)
    return path


def test_external_head_trains_through_a_recipe_by_name(tmp_path):
    head_file = contributed_head(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sae_zoo.cli", "fit", str(ROOT / "recipes/synthetic/unknown.yaml"),
           f"imports=[{head_file}]", "encoder.name=tied", "encoder.bias=true", "data.n_train=128",
           "data.n_test=128", "data.steps_per_epoch=50", "trainer.max_steps=100", "trainer.accelerator=cpu",
           f"run_dir={run}", "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == "tied" and metrics["steps"] == 100

    # the checkpoint reloads the contributed head (once its module is imported) and reproduces the metrics
    sys.path.insert(0, str(tmp_path))
    try:
        import tied_head  # noqa: F401
    finally:
        sys.path.remove(str(tmp_path))
    model = SparseCoder.load_from_checkpoint(run / "model.ckpt")
    assert type(model.encoder).__name__ == "TiedEncoder" and model.encoder.config()["bias"] is True
    dm = SyntheticSparseDataModule(n_train=128, n_test=128)
    with torch.no_grad():
        codes = model.encode(dm.test_x)
        expected = torch.relu(dm.test_x @ model.dictionary.atoms.T + model.encoder.bias)
    torch.testing.assert_close(codes, expected)
    assert abs(metrics["test"]["mcc"] - functional.mcc(codes, dm.test_codes).item()) < 1e-6


def test_tied_head_uses_the_dictionary_it_is_given(tmp_path):
    sys.path.insert(0, str(tmp_path))
    contributed_head(tmp_path)
    try:
        import tied_head
    finally:
        sys.path.remove(str(tmp_path))
    head = tied_head.TiedEncoder(d_model=3, n_latents=4, bias=False)
    d = Dictionary.from_tensor(torch.eye(4, 3) + 0.1)
    x = torch.randn(5, 3)
    torch.testing.assert_close(head(x, d), torch.relu(x @ d.atoms.T))
