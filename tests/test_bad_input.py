"""Bad input found by trying the library as a new user would: each case gets a clear error that names
the argument, key, value, file or shape at fault, and the CLI prints it without a traceback."""

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.cli import main
from sae_zoo.data import ActivationDataModule, SyntheticSparseDataModule, generate_sparse_data
from sae_zoo.hub import load_sae
from sae_zoo.metrics import functional
from sae_zoo.recipe import RecipeError, fit, load_recipe

ROOT = Path(__file__).resolve().parents[1]
KNOWN_D = ROOT / "recipes" / "synthetic" / "known_dictionary.yaml"
TINY = ["data.n_train=64", "data.n_test=64", "data.steps_per_epoch=10", "trainer.max_steps=10",
        "trainer.accelerator=cpu"]


@pytest.fixture
def atoms():
    return generate_sparse_data(8, 12, 6, 3, seed=1)[2]


# ---- silent before: now refused ----

def test_a_negative_step_count_is_refused():
    with pytest.raises(ValueError, match="fista needs steps >= 1, got steps=-5"):
        create_encoder("fista", d_model=6, n_latents=12, steps=-5)


@pytest.mark.parametrize("name", ["linear", "support_search"])
def test_nan_and_inf_inputs_are_refused(name, atoms):
    head = create_encoder(name, d_model=6, n_latents=12).eval()
    x = torch.randn(4, 6)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"1 NaN or infinite input value\(s\) in a batch of shape \(4, 6\)"):
        head(x, Dictionary.from_tensor(atoms))


def test_integer_inputs_are_refused_not_truncated(atoms):
    with pytest.raises(TypeError, match="support_search head expects floating-point inputs, got torch.int64"):
        create_encoder("support_search", d_model=6, n_latents=12)(torch.ones(2, 6, dtype=torch.long),
                                                                   Dictionary.from_tensor(atoms))


def test_functional_fvu_refuses_shapes_that_would_broadcast():
    with pytest.raises(ValueError, match=r"same shape, got \(1, 8\) and \(10, 8\)"):
        functional.fraction_of_variance_unexplained(torch.zeros(1, 8), torch.randn(10, 8))


@pytest.mark.parametrize("fn", [functional.mcc, functional.correlation_matrix])
def test_mcc_of_no_samples_is_an_error_not_zero(fn):
    with pytest.raises(ValueError, match="no samples"):
        fn(torch.zeros(0, 4), torch.zeros(0, 4))


def test_l0_and_fvu_of_no_samples_are_errors():
    with pytest.raises(ValueError, match="no samples"):
        functional.l0(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="no samples"):
        functional.fraction_of_variance_unexplained(torch.zeros(0, 4), torch.zeros(0, 4))


@pytest.mark.parametrize("subfolder", ["../elsewhere", "/etc", "a/../../b"])
def test_a_subfolder_cannot_leave_its_source(tmp_path, subfolder):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="must be a relative path inside the source"):
        load_sae(tmp_path / "src", subfolder=subfolder)


# ---- atomic saves ----

def save_forever(target: Path, seed: int, ready) -> None:
    torch.manual_seed(seed)
    model = SparseCoder(create_encoder("mlp", d_model=6, n_latents=12, hidden=64), Dictionary(12, 6))
    ready.set()
    while True:
        model.save_pretrained(target)


def test_a_save_killed_at_any_moment_leaves_the_old_model_or_the_new_one(tmp_path):
    """20 saves killed (SIGKILL) at random moments over an existing save: the folder always loads, as
    one model or the other, never a mix; the next save removes the staging folders the killed ones left."""
    context = multiprocessing.get_context("fork")  # a forked child starts at once: no second import of torch
    target = tmp_path / "model"
    x = torch.randn(5, 6)

    def codes_of_seed(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model = SparseCoder(create_encoder("mlp", d_model=6, n_latents=12, hidden=64), Dictionary(12, 6))
        return model.encode(x)

    def save_and_kill(seed: int, after: float) -> None:
        ready = context.Event()
        child = context.Process(target=save_forever, args=(target, seed, ready), daemon=True)
        child.start()
        assert ready.wait(60)
        time.sleep(after)
        os.kill(child.pid, signal.SIGKILL)
        child.join()

    old, new = codes_of_seed(1), codes_of_seed(2)
    save_and_kill(1, after=0.3)
    assert torch.equal(SparseCoder.from_pretrained(target).encode(x), old)
    rng, outcomes = random.Random(0), []
    for _ in range(20):
        save_and_kill(2, after=rng.uniform(0.0, 0.05))
        codes = SparseCoder.from_pretrained(target).encode(x)
        outcomes.append("old" if torch.equal(codes, old) else "new" if torch.equal(codes, new) else "mixed")
    assert "mixed" not in outcomes and "new" in outcomes, outcomes
    SparseCoder.from_pretrained(target).save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir() if p.name != "model"] == []  # no staging folder is left
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_save_refuses_to_replace_an_unrelated_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    model = SparseCoder(create_encoder("linear", d_model=6, n_latents=12), Dictionary(12, 6))
    with pytest.raises(FileExistsError, match="non-empty folder without config.json"):
        model.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# ---- types ----

@pytest.mark.parametrize("kwargs, message", [
    ({"d_model": "8"}, r"d_model='8' for encoder 'linear' has type str; expected int"),
    ({"d_model": 8.5}, r"d_model=8.5 for encoder 'linear' has type float; expected int"),
])
def test_a_string_or_float_where_an_integer_belongs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_encoder("linear", **{"d_model": 8, "n_latents": 4, **kwargs})


def test_types_of_head_and_data_arguments():
    with pytest.raises(ValueError, match=r"k='3' for encoder 'topk' has type str; expected int"):
        create_encoder("topk", d_model=8, n_latents=4, k="3")
    with pytest.raises(ValueError, match=r"data.n_latents='16' for the synthetic data has type str; expected int"):
        SyntheticSparseDataModule(n_latents="16")


@pytest.mark.parametrize("override, message", [
    ("data.n_latents=abc", r"data.n_latents='abc' for data 'synthetic' has type str; expected int"),
    ("trainer.max_steps=abc", r"trainer.max_steps='abc' for lightning.Trainer has type str; expected int"),
    ("encoder.hidden=abc", r"encoder.hidden='abc' for encoder 'mlp' has type str"),
])
def test_recipe_values_of_the_wrong_type_are_named(override, message, capsys):
    with pytest.raises(RecipeError, match=message):
        load_recipe(KNOWN_D, ["encoder.name=mlp", override])
    assert main(["fit", str(KNOWN_D), "encoder.name=mlp", override]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and override.split("=")[0] in err


# ---- dtypes, shapes and empty batches ----

def test_float64_inputs_are_cast_to_the_heads_dtype(atoms):
    head = create_encoder("linear", d_model=6, n_latents=12)
    x = torch.randn(3, 6)
    torch.testing.assert_close(head(x.double()), head(x))


@pytest.mark.parametrize("name, kwargs", [("support_search", {}), ("sparse_coding", {"n_train": 8, "steps": 5})])
def test_an_empty_batch_gives_empty_codes(name, kwargs, atoms):
    head = create_encoder(name, d_model=6, n_latents=12, **kwargs).eval()
    assert head(torch.zeros(0, 6), Dictionary.from_tensor(atoms)).shape == (0, 12)


def test_nan_atoms_are_named_as_such():
    atoms = torch.ones(3, 2)
    atoms[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in atoms \[1\]"):
        Dictionary.from_tensor(atoms)


# ---- files ----

def tiny_run(tmp_path: Path) -> Path:
    run_dir, _ = fit(load_recipe(KNOWN_D, [*TINY, f"run_dir={tmp_path / 'run'}"]), progress=False)
    return run_dir


def test_a_truncated_checkpoint_is_named(tmp_path, capsys):
    run_dir = tiny_run(tmp_path)
    data = (run_dir / "model.ckpt").read_bytes()
    (run_dir / "model.ckpt").write_bytes(data[: len(data) // 2])
    assert main(["card", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "model.ckpt: not a readable checkpoint" in err and "Traceback" not in err


def test_a_recipe_folder_and_a_run_dir_file_are_named(tmp_path, capsys):
    assert main(["fit", str(ROOT / "recipes")]) == 2
    assert "recipes: is a folder, not a recipe file" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["fit", str(KNOWN_D), *TINY, f"run_dir={tmp_path / 'afile'}"]) == 2
    assert "afile exists and is not a folder" in capsys.readouterr().err


def test_a_data_files_glob_that_matches_nothing_is_named(tmp_path):
    dm = ActivationDataModule("unused-model", "resid_post.0", data_files=str(tmp_path / "nothing-*.txt"),
                              cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data.data_files: '.*nothing-\*.txt' matches no file"):
        next(dm.documents())


@pytest.mark.parametrize("offline", [False, True])
def test_a_mistyped_local_path_says_no_local_folder_exists(tmp_path, offline, monkeypatch):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for mistyped in (str(tmp_path / "no-such-run"), "no-such-run"):
        with pytest.raises(FileNotFoundError, match=f"no local folder '{mistyped}'"):
            load_sae(mistyped)
        with pytest.raises(FileNotFoundError, match=f"no local folder '{mistyped}'"):
            SparseCoder.from_pretrained(mistyped)


# ---- trainer options ----

@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=-5", r"trainer: lightning.Trainer cannot be built from .*max_steps=-5.*non-negative"),
    ("trainer.accelerator=gpu", r"trainer: lightning.Trainer cannot be built from .*accelerator='gpu'"),
    ("trainer.max_steps=[5", r"an override's value is not valid YAML"),
    ("encoder..name=mlp", r"'encoder..name' is not a key"),
    ("model.lr=-1", r"model.lr must be positive, got -1"),
    ("data.batch_size=0", r"data.batch_size must be at least 1, got 0"),
    ("trainer.precision=77", r"trainer.precision=77 for lightning.Trainer has type int"),
])
def test_bad_trainer_and_model_options_fail_before_anything_is_written(tmp_path, override, message, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", str(KNOWN_D), *TINY, override, f"run_dir={run_dir}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not run_dir.exists()


def test_demo_needs_a_seed(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0"])
    assert "--seeds: must be at least 1, got 0" in capsys.readouterr().err


def test_a_run_that_failed_before_its_checkpoint_can_be_retried_in_its_folder(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = load_recipe(KNOWN_D, [*TINY, f"run_dir={run_dir}"])
    import sae_zoo.recipe as recipe

    monkeypatch.setattr(recipe, "evaluate_model", lambda *a: (_ for _ in ()).throw(RuntimeError("stopped")))
    with pytest.raises(RuntimeError, match="stopped"):
        fit(cfg, progress=False)
    assert (run_dir / "config.yaml").exists() and not (run_dir / "model.ckpt").exists()
    monkeypatch.undo()
    run_dir_again, metrics = fit(cfg, progress=False)  # the same command, the same run_dir
    assert run_dir_again == run_dir and (run_dir / "model.ckpt").exists() and metrics["steps"] == 10
    with pytest.raises(RecipeError, match="holds a finished run"):
        fit(cfg, progress=False)


def test_the_cli_prints_no_traceback_for_a_bad_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"encoder": {"name": "linear", "bias": "maybe"}}))
    assert main(["fit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "encoder.bias='maybe'" in err and "Traceback" not in err
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "0", "")


# ---- training SAEs: options that cannot do what they say ----

@pytest.mark.parametrize("head, kwargs", [("topk", {"k": 3}), ("batchtopk", {"k": 3}),
                                          ("residual_mlp", {"hidden": 4, "k": 3})])
def test_a_target_l0_that_a_top_k_head_forces_anyway_is_refused(head, kwargs):
    encoder = create_encoder(head, d_model=6, n_latents=12, **kwargs)
    with pytest.raises(ValueError, match=rf"target_l0=5.*'{head}' head keeps k=3 codes per sample.*set its k"):
        SparseCoder(encoder, Dictionary(12, 6, bias=True), l1_coeff=1.0, target_l0=5)


@pytest.mark.parametrize("widths, message", [([4, 8], r"must end at n_latents \(12\), got \[4, 8\]"),
                                             ([8, 4, 12], "strictly increasing"), ([0, 12], "positive")])
def test_matryoshka_widths_that_do_not_nest_up_to_the_dictionary_are_refused(widths, message):
    with pytest.raises(ValueError, match=message):
        SparseCoder(create_encoder("batchtopk", d_model=6, n_latents=12, k=3), Dictionary(12, 6),
                    matryoshka_widths=widths)


def test_learned_norms_on_a_frozen_dictionary_are_refused_in_a_recipe(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", str(KNOWN_D), *TINY, "dictionary.atom_norms=learned", f"run_dir={run_dir}",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "dictionary.atom_norms: the known_dictionary setting" in err, err
    assert not run_dir.exists()
