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


def test_readme_transcoder_block_runs_on_the_skip_transcoders_layout(tmp_path, monkeypatch, hub):
    """The transcoder block, against the loopback Hub holding a sparsify skip-transcoder in the layout of
    ``EleutherAI/skip-transcoder-SmolLM2-135M-128x`` (``model.layers.N.mlp/{cfg.json, sae.safetensors}``)."""
    import json

    import torch
    import torch.nn.functional as F
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = next(b for b in blocks if "skip-transcoder" in b)
    d, n, k = 8, 32, 4
    g = torch.Generator().manual_seed(0)
    tensors = {"encoder.weight": torch.randn(n, d, generator=g), "encoder.bias": torch.randn(n, generator=g),
               "W_dec": F.normalize(torch.randn(n, d, generator=g), dim=-1), "b_dec": torch.randn(d, generator=g),
               "W_skip": torch.randn(d, d, generator=g)}
    for layer in (3, 4):
        folder = tmp_path / "repo" / f"model.layers.{layer}.mlp"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": n, "k": k,
                                                     "skip_connection": True, "transcode": True, "d_in": d}))
    HfApi().create_repo("EleutherAI/skip-transcoder-SmolLM2-135M-128x", exist_ok=True)  # the catalogue test may serve it
    HfApi().upload_folder(repo_id="EleutherAI/skip-transcoder-SmolLM2-135M-128x", folder_path=tmp_path / "repo")
    mlp_in = torch.randn(16, d, generator=g)
    namespace = {"mlp_in": mlp_in}
    exec(compile(code, "README.md", "exec"), namespace)
    pre = F.relu(mlp_in @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, idx = pre.topk(k, dim=-1)
    expected = (values[..., None] * tensors["W_dec"][idx]).sum(-2) + tensors["b_dec"] + mlp_in @ tensors["W_skip"].T
    torch.testing.assert_close(namespace["mlp_out"], expected, atol=1e-5, rtol=1e-5)


def test_the_readme_demo_block_is_checked_against_the_demos_output():
    """The checker CI runs after ``sae-zoo demo`` (tests/readme_demo.py): it reads the README's block, agrees with
    itself, and names a figure that has drifted."""
    from readme_demo import disagreements, readme_block

    readme = (ROOT / "README.md").read_text()
    block = readme_block(readme)
    assert disagreements(readme, block) == []
    mlp_l0 = re.search(r"^MLP .*?([\d.]+)$", block, re.M).group(1)
    moved = f"{float(mlp_l0) + 0.2:.2f}"
    drifted = re.sub(rf"{re.escape(mlp_l0)}$", moved, block, flags=re.M)
    assert disagreements(readme, drifted) == [f"MLP (hidden=256) L0: README {float(mlp_l0)}, demo {float(moved)}"]
