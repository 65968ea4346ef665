"""CONTRIBUTING.md, followed as written: its head, as an outside module, trains through a recipe by name;
and, added to a scratch copy of the package as its own file beside its own test, it passes the shared
checks of every head and its test with no other file touched."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.metrics import functional

ROOT = Path(__file__).resolve().parents[1]


def guide_blocks() -> list[str]:
    """The guide's Python code blocks: the head's file, then its test."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "CONTRIBUTING.md").read_text(), re.S)


def guide_block(marker: str) -> str:
    """The guide's one Python code block that holds ``marker``."""
    (block,) = [b for b in guide_blocks() if marker in b]
    return block


def contributed_head(tmp_path: Path) -> Path:
    path = tmp_path / "tied_head.py"
    path.write_text(guide_blocks()[0])
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


def test_a_new_head_is_its_file_and_its_test(tmp_path):
    """The guide's two files in a scratch copy: the shared checks find the head by themselves."""
    scratch = tmp_path / "scratch"
    shutil.copytree(ROOT / "sae_zoo", scratch / "sae_zoo", ignore=shutil.ignore_patterns("__pycache__"))
    (scratch / "tests").mkdir()
    for name in ("conftest.py", "hub_server.py", "test_every_head.py"):
        shutil.copy(ROOT / "tests" / name, scratch / "tests" / name)
    head, test = guide_blocks()[:2]
    (scratch / "sae_zoo" / "encoders" / "tied.py").write_text(head)  # the two files the guide asks for
    (scratch / "tests" / "test_tied.py").write_text(test)

    env = {**os.environ, "PYTHONPATH": str(scratch)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "tied",
                             "tests/test_every_head.py", "tests/test_tied.py"],
                            cwd=scratch, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b7 passed\b", result.stdout), result.stdout  # the 6 shared checks of every head + its own
    where = subprocess.run([sys.executable, "-c", "import sae_zoo; print(sae_zoo.__file__)"], cwd=scratch, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(scratch))


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


def contributed_aid(tmp_path: Path):
    """The guide's training aid, imported from its own file as a user's module."""
    path = tmp_path / "decorrelation_aid.py"
    path.write_text(guide_block("register_training_aid("))
    sys.path.insert(0, str(tmp_path))
    try:
        import decorrelation_aid
    finally:
        sys.path.remove(str(tmp_path))
    return path, decorrelation_aid


def test_a_training_aid_joins_the_loss_without_an_edit_to_the_model(tmp_path):
    _, module = contributed_aid(tmp_path)
    dm = SyntheticSparseDataModule(n_train=64, n_test=64)
    x = dm.test_x[:32]

    def model(**kwargs):
        torch.manual_seed(0)
        return SparseCoder({"name": "linear", "d_model": 8, "n_latents": 16},
                           Dictionary(16, 8, trainable=True), **kwargs)

    plain, aided = model(), model(aids=[{"name": "atom_decorrelation", "coeff": 2.0}])
    assert isinstance(aided.aids[-1], module.AtomDecorrelation) and aided.hparams["aids"] == [
        {"name": "atom_decorrelation", "coeff": 2.0}]
    atoms = torch.nn.functional.normalize(aided.dictionary.directions, dim=-1)
    cosines = atoms @ atoms.T
    expected = cosines[~torch.eye(16, dtype=torch.bool)].square().mean()
    losses, base = aided.training_losses(x), plain.training_losses(x)
    torch.testing.assert_close(losses["atom_cosine"], expected)
    torch.testing.assert_close(losses["loss"], base["loss"] + 2.0 * expected)  # the only change to the loss


def test_a_training_aid_trains_through_a_recipe_by_name_and_reloads(tmp_path, monkeypatch):
    from sae_zoo.recipe import RecipeError, fit, load_recipe
    from sae_zoo.training import TRAINING_AIDS

    aid_file, _ = contributed_aid(tmp_path)
    # the recipe imports the file as a user's run does, and registers its own class (not the one imported above)
    monkeypatch.delitem(TRAINING_AIDS, "atom_decorrelation", raising=False)
    runs = {}
    for label, aids in (("plain", "[]"), ("aided", "[{name: atom_decorrelation, coeff: 10.0}]")):
        runs[label] = tmp_path / label
        fit(load_recipe(ROOT / "recipes/synthetic/unknown.yaml",
                        [f"imports=[{aid_file}]", f"model.aids={aids}", "data.n_train=128", "data.n_test=128",
                         "data.steps_per_epoch=50", "trainer.max_steps=100", "trainer.accelerator=cpu",
                         f"run_dir={runs[label]}"]), progress=False)

    def mean_square_cosine(run: Path) -> float:
        model = SparseCoder.load_from_checkpoint(run / "model.ckpt")
        atoms = torch.nn.functional.normalize(model.dictionary.directions.detach(), dim=-1)
        return float((atoms @ atoms.T).square().sum() - 16) / (16 * 15), model

    plain, _ = mean_square_cosine(runs["plain"])
    aided, model = mean_square_cosine(runs["aided"])
    assert type(model.aids[-1]).__name__ == "AtomDecorrelation" and model.aids[-1].coeff == 10.0
    assert aided < 0.8 * plain, (aided, plain)  # the same seed and data: the aid pushed the atoms apart

    with pytest.raises(RecipeError, match=re.escape("model.aids[0].coef")):
        load_recipe(ROOT / "recipes/synthetic/unknown.yaml",
                    [f"imports=[{aid_file}]", "model.aids=[{name: atom_decorrelation, coef: 1.0}]"])


def test_a_reconstruction_term_is_its_file_and_its_test(tmp_path):
    """The guide's reconstruction term and its test, as two files of a user's: the test passes, and a recipe that
    imports the file trains with the term by name, and its checkpoint rebuilds it."""
    from sae_zoo.recipe import fit, load_recipe

    (tmp_path / "normalized_mse.py").write_text(guide_block('@register_reconstruction("normalized_mse")'))
    (tmp_path / "test_normalized_mse.py").write_text(guide_block("from normalized_mse import NormalizedMSE"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_normalized_mse.py"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    cfg = load_recipe(ROOT / "recipes/synthetic/unknown.yaml",
                      [f"imports=[{tmp_path / 'normalized_mse.py'}]", "model.reconstruction=normalized_mse",
                       "data.n_train=128", "data.n_test=128", "data.steps_per_epoch=20", "trainer.max_steps=60",
                       "trainer.log_every_n_steps=10", "trainer.accelerator=cpu", f"run_dir={tmp_path / 'run'}"])
    run_dir, _ = fit(cfg, progress=False)
    model = SparseCoder.load_from_checkpoint(run_dir / "model.ckpt")
    assert type(model.reconstruction).__name__ == "NormalizedMSE" and model.hparams["reconstruction"] == "normalized_mse"
    with open(run_dir / "logs" / "metrics.csv") as f:
        logged = [float(row["train/mse"]) for row in csv.DictReader(f) if row.get("train/mse")]
    assert len(logged) == 6 and logged[-1] < 0.8 * logged[0]  # the term's loss is what trained


def test_a_model_family_is_its_file_and_its_test(tmp_path):
    """The guide's family and its test, as two files of a user's: the test passes, and a model of that family is
    saved with it and rebuilt from its hyper-parameters."""
    (tmp_path / "denoiser.py").write_text(guide_block('@register_family("denoiser")'))
    (tmp_path / "test_denoiser.py").write_text(guide_block("from denoiser import Denoiser"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_denoiser.py"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    from sae_zoo.families import FAMILIES
    from sae_zoo.recipe import import_modules

    import_modules([str(tmp_path / "denoiser.py")])
    try:
        model = SparseCoder(create_encoder("topk", d_model=8, n_latents=32, k=4), Dictionary(32, 8), family="denoiser")
        assert model.hparams["family"] == "denoiser"
        assert type(SparseCoder(**model.hparams).family).__name__ == "Denoiser"
    finally:
        del FAMILIES["denoiser"]


def test_a_data_source_joins_through_a_recipes_imports(tmp_path):
    path = tmp_path / "rows_file.py"
    path.write_text(guide_block("register_datamodule("))
    rows = torch.relu(torch.randn(1024, 16, generator=torch.Generator().manual_seed(0)))
    torch.save(rows, tmp_path / "rows.pt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"setting: unknown\nimports: [{path}]\ndata: {{name: rows_file, path: {tmp_path / 'rows.pt'}}}\n"
                      "dictionary: {n_latents: 32}\nencoder: {name: topk, k: 4}\n"
                      "trainer: {max_steps: 20, accelerator: cpu}\n")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "sae_zoo.cli", "fit", str(recipe), f"run_dir={run}", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 20 and 0 < metrics["test"]["fvu"] < 1.5
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["name"] == "rows_file"
