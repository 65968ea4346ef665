"""The README's Python tour runs as written (with fewer steps)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tour_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes checkpoints under the working directory
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "max_steps=20_000" in code
    code = code.replace("max_steps=20_000", "max_steps=30, accelerator='cpu', enable_progress_bar=False")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert all(f"'{name}'" in out for name in ("fista", "ista", "ito", "lca", "linear", "lista", "mlp", "topk"))
    assert "test/mcc" in out
    assert namespace["codes"].shape == (1024, 16) and namespace["x_hat"].shape == (1024, 8)
