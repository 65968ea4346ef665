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


def test_readme_hub_section_runs(tmp_path, monkeypatch, hub, capsys):
    """The "Share and reuse" block, run against the loopback Hub with the two things it assumes: a
    trained ``model`` and a Hub repo holding a SAELens SAE in a subfolder."""
    import json

    import torch
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from sae_zoo import Dictionary, SparseCoder, create_encoder

    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = next(b for b in blocks if "load_sae(" in b)
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(8, 32, generator=g), "b_enc": torch.zeros(32),
               "W_dec": torch.randn(32, 8, generator=g), "b_dec": torch.randn(8, generator=g)},
              str(sae_dir / "sae_weights.safetensors"))
    (sae_dir / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 8, "d_sae": 32, "dtype": "float32", "apply_b_dec_to_input": True,
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.8.hook_resid_pre", "model_name": "gpt2"}}))
    HfApi().create_repo("you/gpt2-saes")
    HfApi().upload_folder(repo_id="you/gpt2-saes", folder_path=sae_dir, path_in_repo="blocks.8.hook_resid_pre")
    model = SparseCoder(create_encoder("mlp", d_model=8, n_latents=16, hidden=32), Dictionary(16, 8, trainable=False))
    namespace = {"model": model}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "saelens blocks.8.hook_resid_pre" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "mlp-known-dictionary").iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "gpt2-sae-for-saelens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    x = torch.randn(5, 8)
    assert torch.equal(namespace["model"].encode(x), model.encode(x))
    assert namespace["refined"].encode(x).shape == (5, 32)
