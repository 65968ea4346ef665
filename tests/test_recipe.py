import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sae_zoo import SparseCoder
from sae_zoo.encoders import EncoderHead, registry
from sae_zoo.data import SyntheticSparseDataModule
from sae_zoo.metrics import functional
from sae_zoo.report import read_curve
from sae_zoo.recipe import RecipeError, build, fit, load_recipe

class BiaslessHead(EncoderHead):
    name = "test_biasless"

    def forward(self, x, dictionary=None):
        return torch.relu(x @ dictionary.atoms.T)


@pytest.fixture
def biasless_head(monkeypatch):
    """A head that takes no ``bias``, registered for one test only."""
    monkeypatch.setitem(registry._REGISTRY, BiaslessHead.name, BiaslessHead)


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "synthetic"
KNOWN_D = RECIPES / "known_dictionary.yaml"
TINY = ["data.n_train=128", "data.n_test=128", "data.steps_per_epoch=50", "trainer.max_steps=100",
        "trainer.accelerator=cpu"]


@pytest.mark.parametrize("name, steps", [("known_dictionary", 20000), ("known_codes", 20000), ("unknown", 40000)])
def test_recipes_carry_the_papers_defaults(name, steps):
    cfg = load_recipe(RECIPES / f"{name}.yaml")
    assert cfg.setting == name and cfg.trainer.max_steps == steps
    assert cfg.data.n_latents == 16 and cfg.data.d_model == 8 and cfg.data.k == 3 and cfg.data.batch_size is None
    assert cfg.data.seed == 20240625 and cfg.model.lr == 1e-3
    assert cfg.model.get("l1_coeff", 0.01) == 0.01


def test_overrides_apply():
    cfg = load_recipe(KNOWN_D, ["encoder.name=mlp", "encoder.hidden=256", "trainer.max_steps=5000", "seed=1"])
    assert (cfg.encoder.name, cfg.encoder.hidden, cfg.trainer.max_steps, cfg.seed) == ("mlp", 256, 5000, 1)
    assert cfg.data.seed == 20240625


@pytest.mark.parametrize("override, message", [
    ("sede=1", "sede"),
    ("data.n_latent=3", "data.n_latent"),
    ("encoder.hiden=3", "encoder.hiden"),
    ("encoder.name=nope", "unknown encoder 'nope'"),
    ("trainer.max_step=3", "trainer.max_step"),
    ("model.l1=3", "model.l1"),
    ("setting=partly_known", "setting"),
    ("dictionary.bias=true", "dictionary.bias"),
    ("seed=abc", "seed"),
    ("imports=[no_such_module_xyz]", "no_such_module_xyz"),
    ("seed", "key=value"),
])
def test_bad_keys_are_named(override, message):
    overrides = ["encoder.name=mlp", override] if override.startswith("encoder.hiden") else [override]
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(KNOWN_D, overrides)
    if "=" in override:
        assert str(KNOWN_D) in str(info.value)


@pytest.mark.parametrize("line, message", [("seeed: 3", "bad key 'seeed': .*Did you mean: 'seed'"),
                                           ("checkpoint_every: often", "bad key 'checkpoint_every'")])
def test_a_recipe_files_bad_top_level_key_is_named_as_on_the_command_line(tmp_path, line, message):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(KNOWN_D.read_text() + line + "\n")
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(recipe)
    assert str(recipe) in str(info.value) and "top-level keys: setting, seed" in str(info.value)


def test_tilde_deletes_a_recipe_key(biasless_head):
    assert "bias" not in load_recipe(KNOWN_D, ["~encoder.bias"]).encoder
    with pytest.raises(RecipeError, match=r"the recipe sets encoder\.bias: drop it with ~encoder\.bias"):
        load_recipe(KNOWN_D, ["encoder.name=test_biasless"])
    assert load_recipe(KNOWN_D, ["encoder.name=test_biasless", "~encoder.bias"]).encoder.name == "test_biasless"
    with pytest.raises(RecipeError, match=r"unknown key\(s\) encoder\.nope") as info:
        load_recipe(KNOWN_D, ["encoder.nope=1"])
    assert "~" not in str(info.value)  # the user's own typo: nothing to drop from the recipe
    with pytest.raises(RecipeError, match="cannot delete 'seed'"):
        load_recipe(KNOWN_D, ["~seed"])


def test_a_recipe_section_replaces_the_default_one(tmp_path):
    recipe = tmp_path / "fista.yaml"
    recipe.write_text("encoder: {name: fista, steps: 20}\n")
    assert dict(load_recipe(recipe).encoder) == {"name": "fista", "steps": 20}
    assert load_recipe(None).encoder.bias is False  # the default recipe: the paper's bias-free SAE


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("encoder: linear\n")
    with pytest.raises(RecipeError, match=r"scalar\.yaml: encoder: must be a mapping"):
        load_recipe(scalar)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="list.yaml: a recipe must be a YAML mapping"):
        load_recipe(listy)


def test_fit_writes_a_run_directory_whose_metrics_match_the_checkpoint(tmp_path):
    cfg = load_recipe(KNOWN_D, [*TINY, f"run_dir={tmp_path / 'run'}"])
    run_dir, metrics = fit(cfg, progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "logs", "metrics.json", "model.ckpt"]
    assert OmegaConf.load(run_dir / "config.yaml") == cfg
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["steps"] == 100 and on_disk["seed"] == 20240625 and on_disk["data_seed"] == 20240625
    model = SparseCoder.load_from_checkpoint(run_dir / "model.ckpt")
    dm = SyntheticSparseDataModule(n_train=128, n_test=128)
    with torch.no_grad():
        x_hat, codes = model(dm.test_x)
    assert on_disk["test"]["mcc"] == pytest.approx(functional.mcc(codes, dm.test_codes).item(), abs=1e-9)
    assert on_disk["test"]["fvu"] == pytest.approx(functional.fraction_of_variance_unexplained(x_hat, dm.test_x).item(),
                                                   rel=1e-6)
    steps, losses = read_curve(run_dir, "train/loss")  # logged every trainer.log_every_n_steps (100)
    assert steps == [99] and 0 < losses[0] < 1
    with pytest.raises(RecipeError, match="already exists"):
        fit(cfg, progress=False)


def test_overcomplete_dictionary_is_scored_against_the_true_latents(tmp_path):
    cfg = load_recipe(RECIPES / "unknown.yaml", [*TINY, "dictionary.n_latents=24", f"run_dir={tmp_path / 'run'}"])
    run_dir, metrics = fit(cfg, progress=False)
    model = SparseCoder.load_from_checkpoint(run_dir / "model.ckpt")
    assert model.dictionary.weight.shape == (24, 8)
    dm = SyntheticSparseDataModule(n_train=128, n_test=128)
    with torch.no_grad():
        codes = model.encode(dm.test_x)
    assert metrics["test"]["mcc"] == pytest.approx(functional.mcc(codes, dm.test_codes).item(), abs=1e-6)
    assert metrics["test"]["dictionary_mcc"] == pytest.approx(
        functional.dictionary_mcc(model.dictionary.atoms, dm.dictionary).item(), abs=1e-6)


def test_an_inference_only_head_skips_training(tmp_path):
    cfg = load_recipe(KNOWN_D, [*TINY, "encoder.name=fista", "~encoder.bias", "encoder.steps=50",
                                f"run_dir={tmp_path / 'run'}"])
    run_dir, metrics = fit(cfg, progress=False)
    assert metrics["steps"] == 0
    model = SparseCoder.load_from_checkpoint(run_dir / "model.ckpt").eval()
    dm = SyntheticSparseDataModule(n_train=128, n_test=128)
    expected = functional.mcc(model.encode(dm.test_x), dm.test_codes).item()
    assert metrics["test"]["mcc"] == pytest.approx(expected, abs=1e-6) and expected > 0.9


def test_same_seed_same_result_other_seed_other_init(tmp_path):
    results = [fit(load_recipe(KNOWN_D, [*TINY, f"seed={s}", f"run_dir={tmp_path / str(i)}"]), progress=False)[1]
               for i, s in enumerate([3, 3, 4])]
    assert results[0]["test"] == results[1]["test"]
    assert results[0]["test"]["mcc"] != results[2]["test"]["mcc"]


def test_training_matches_the_authors_loop_step_for_step():
    """The known-dictionary recipe trains exactly like the authors' code (experiments/known_D.py)."""
    steps, seed = 300, 20240626
    cfg = load_recipe(KNOWN_D, [f"seed={seed}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
                                "encoder.name=mlp", "encoder.hidden=32"])
    dm, model = build(cfg)
    import lightning as L
    L.Trainer(**cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)

    # the authors' loop, restated
    torch.manual_seed(seed + 42)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 32, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 16, bias=False), torch.nn.ReLU())
    optim = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    for _ in range(steps):
        s = encoder(dm.train_x)
        loss = F.mse_loss(s @ dm.dictionary, dm.train_x) + 0.01 * s.abs().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        ours, theirs = model.encode(dm.test_x), encoder(dm.test_x)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


def test_a_batchtopk_sae_written_plainly_gets_the_training_that_recovers_features_best(tmp_path):
    """`encoder: {name: batchtopk, k: ...}` on a learned dictionary gets the head's defaults (learned atom norms,
    a decoder bias subtracted before encoding, a tied start, training at 1.25k annealed from twice that, lr 7e-3
    warmed up over the first 10% of the steps and decayed over the last 20%), shown in
    the saved config; a recipe that sets a key keeps its own value; frozen and pretrained dictionaries, and the
    paper's heads, get none."""
    plain = ["setting=unknown", "encoder.name=batchtopk", "encoder.k=3", "~encoder.bias",
             "model.matryoshka_widths=[4,16]"]
    cfg = load_recipe(KNOWN_D, [*TINY, *plain])
    assert cfg.dictionary == {"bias": True, "atom_norms": "learned"}
    assert cfg.encoder.subtract_decoder_bias is True and cfg.model.tied_init is True and cfg.encoder.k_anneal == 2
    assert cfg.encoder.k_train_factor == 1.25 and cfg.model.lr == 1e-3  # the recipe sets its learning rate
    unset = load_recipe(KNOWN_D, [*TINY, *plain, "~model.lr"]).model
    assert unset.lr == 7e-3 and unset.lr_warmup_steps == 0.1 and unset.lr_decay_steps == 0.2
    assert load_recipe(KNOWN_D, [*TINY, "setting=unknown", "encoder.name=topk", "encoder.k=3", "~encoder.bias",
                                 "~model.lr"]).model.lr == 3e-3  # the top-k head's own
    _, model = build(cfg)
    assert model.encoder.train_k == 4 and model.encoder.k == 3  # 3.75, rounded half up
    assert model.dictionary.learns_norms and model.dictionary.bias is not None
    torch.testing.assert_close(model.encoder.linear.weight, model.dictionary.weight)  # the tied start
    run_dir, _ = fit(load_recipe(KNOWN_D, [*TINY, *plain, f"run_dir={tmp_path / 'run'}"]), progress=False)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.dictionary.atom_norms == "learned" and saved.model.tied_init is True
    assert not torch.allclose(SparseCoder.load_from_checkpoint(run_dir / "model.ckpt").dictionary.atom_norms,
                              torch.ones(16))  # the norms trained
    kept = load_recipe(KNOWN_D, [*TINY, *plain, "dictionary.atom_norms=false", "model.tied_init=false",
                                 "encoder.k_anneal=1", "encoder.k_train_factor=1"])
    assert kept.dictionary.atom_norms is False and kept.model.tied_init is False and kept.encoder.k_anneal == 1
    assert kept.encoder.k_train_factor == 1
    assert "atom_norms" not in load_recipe(KNOWN_D, [*TINY, "encoder.name=batchtopk", "encoder.k=3",
                                                     "~encoder.bias"]).dictionary  # frozen: the true dictionary
    assert load_recipe(RECIPES / "unknown.yaml").dictionary == {"bias": False}  # the paper's SAE: as published


def test_a_users_file_is_imported_even_when_its_stem_names_another_module(tmp_path, monkeypatch):
    """A user's ``utils.py`` beside some package's ``utils``: it is imported (once), not skipped."""
    import sys
    import types

    from sae_zoo.recipe import import_modules

    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))  # somebody else's utils
    marker = tmp_path / "imported.txt"
    user = tmp_path / "utils.py"
    user.write_text(f"from pathlib import Path\np = Path({str(marker)!r})\np.write_text(p.read_text() + 'x' "
                    "if p.exists() else 'x')\n")
    import_modules([str(user)])
    import_modules([str(user)])
    assert marker.read_text() == "x"


def test_a_bug_while_building_the_trainer_is_not_reported_as_a_bad_recipe(monkeypatch):
    import lightning

    from sae_zoo.recipe import make_trainer, plan

    p = plan(load_recipe(None, ["trainer.accelerator=cpu"]))
    with pytest.raises(RecipeError, match=r"trainer: lightning.Trainer cannot be built from trainer.accelerator='tpu'"):
        make_trainer(plan(load_recipe(None, ["trainer.accelerator=tpu"])))

    def broken(**kwargs):
        raise AttributeError("a bug")

    monkeypatch.setattr(lightning, "Trainer", broken)
    with pytest.raises(AttributeError, match="a bug"):
        make_trainer(p)


@pytest.mark.parametrize("tasks", [5, "party"])
def test_probing_tasks_are_checked_like_every_key(tasks):
    with pytest.raises(RecipeError, match=rf"probing.tasks={tasks!r} for sparse probing has type"):
        load_recipe(None, [f"probing.tasks={tasks}"])


def test_train_seconds_count_training_not_the_validation_inside_the_fit(tmp_path, monkeypatch):
    """A run's ``train_seconds`` (and so a suite's train tok/s) spans what SAELens's ``SAETrainer.fit`` does: the
    training, not the sanity check or the validation loops the fit runs on the way."""
    import time

    def slow_validation(self, batch, batch_idx):
        time.sleep(0.2)

    monkeypatch.setattr(SparseCoder, "validation_step", slow_validation)
    cfg = load_recipe(KNOWN_D, [*TINY, "trainer.max_steps=40", "data.steps_per_epoch=10", f"run_dir={tmp_path / 'run'}"])
    start = time.perf_counter()
    _, metrics = fit(cfg, progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed > 1.0  # the sanity check's and 4 validations' sleeps, at least
    assert 0 < metrics["train_seconds"] < 0.5
