"""save_pretrained / push_to_hub / from_pretrained through the real huggingface_hub client against the
loopback Hub (tests/hub_server.py), model cards, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubError
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors.torch import load_file, save_file

from sae_zoo import Dictionary, SparseCoder, create_encoder
from sae_zoo.cli import main
from sae_zoo.data import generate_sparse_data
from sae_zoo.hub import load_encoder, load_run
from sae_zoo.recipe import fit, load_recipe

FRESH_PROCESS_LOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from sae_zoo import SparseCoder
repo, x_path, out_path, revisions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
x = load_file(x_path)["x"]
out = {}
for revision in revisions:
    model = SparseCoder.from_pretrained(repo, revision=None if revision == "latest" else revision)
    with torch.no_grad():
        x_hat, codes = model(x)
    out[f"{revision}/codes"], out[f"{revision}/x_hat"] = codes, x_hat
save_file(out, out_path)
"""


def tiny_run(tmp_path: Path, name: str, *overrides: str) -> Path:
    cfg = load_recipe("recipes/synthetic/known_dictionary.yaml",
                      ["trainer.max_steps=25", "data.steps_per_epoch=25", "data.n_train=256", "data.n_test=128",
                       f"run_dir={tmp_path / name}", *overrides])
    run_dir, _ = fit(cfg, progress=False)
    return run_dir


def load_in_fresh_process(tmp_path: Path, repo_id: str, x: torch.Tensor, *revisions: str) -> dict[str, torch.Tensor]:
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "fresh.safetensors"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, repo_id, str(tmp_path / "x.safetensors"), str(out),
                    *revisions], check=True, timeout=300)
    return load_file(str(out))


def test_train_push_and_load_in_a_fresh_process_bit_identical_with_revision_pinning(tmp_path, hub, capsys):
    repo_id = "alice/sae-known-dictionary"
    first = tiny_run(tmp_path, "first")
    assert main(["push", str(first), repo_id]) == 0
    first_commit = capsys.readouterr().out.split("revision='")[1].split("'")[0]
    second = tiny_run(tmp_path, "second", "encoder.name=mlp", "encoder.hidden=32")
    assert main(["push", str(second), repo_id]) == 0

    x = generate_sparse_data(64, 16, 8, 3, seed=5)[1]
    loaded = load_in_fresh_process(tmp_path, repo_id, x, "latest", first_commit)
    for run_dir, revision in ((second, "latest"), (first, first_commit)):
        model, _, _ = load_run(run_dir)
        with torch.no_grad():
            x_hat, codes = model(x)
        assert torch.equal(loaded[f"{revision}/codes"], codes)  # bit for bit
        assert torch.equal(loaded[f"{revision}/x_hat"], x_hat)
    assert not torch.equal(loaded["latest/codes"], loaded[f"{first_commit}/codes"])

    api = HfApi()
    assert {"config.json", "model.safetensors", "README.md"} <= set(api.list_repo_files(repo_id))
    assert api.repo_info(repo_id, revision=first_commit).sha == first_commit
    assert api.repo_info(repo_id).sha != first_commit
    config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    assert config["encoder"]["name"] == "mlp" and config["library"] == "sae_zoo"
    assert config["setting"] == "known_dictionary"
    assert config["decoder_provenance"]["source"] == "the data's true dictionary"
    card = ModelCard.load(hf_hub_download(repo_id, "README.md", revision=first_commit), ignore_metadata_errors=False)
    assert card.data.library_name == "sae_zoo" and "encoder-linear" in card.data.tags
    metrics = json.loads((first / "metrics.json").read_text())["test"]
    mcc = next(r for r in card.data.eval_results if r.metric_type == "mcc")
    assert mcc.metric_value == pytest.approx(metrics["mcc"])
    assert f'SparseCoder.from_pretrained("{repo_id}")' in card.text


def test_push_to_a_branch_and_private_repo(hub):
    from sae_zoo.hub import push_model

    _, x, atoms = generate_sparse_data(32, 12, 6, 3, seed=1)
    model = SparseCoder(create_encoder("topk", d_model=6, n_latents=12, k=3), Dictionary.from_tensor(atoms))
    model.push_to_hub("bob/private-topk", private=True)  # the Hub mixin's own push
    with torch.no_grad():
        model.encoder.linear.weight.mul_(-1)
    commit = push_model(model, "bob/private-topk", branch="flipped")  # sae_zoo.hub also makes the branch
    assert hub.repos["bob/private-topk"].private
    assert hub.repos["bob/private-topk"].branches["flipped"] == commit.oid
    flipped = SparseCoder.from_pretrained("bob/private-topk", revision="flipped")
    main_ = SparseCoder.from_pretrained("bob/private-topk")
    assert torch.equal(flipped.encoder.linear.weight, -main_.encoder.linear.weight)
    assert torch.equal(flipped.encode(x), model.encode(x))


def test_save_pretrained_round_trip_and_head_alone_on_another_dictionary(tmp_path):
    _, x, atoms = generate_sparse_data(64, 16, 8, 3)
    model = SparseCoder(create_encoder("fista", d_model=8, n_latents=16, steps=50, warm_start={"name": "linear"}),
                        Dictionary.from_tensor(atoms), l1_coeff=0.02)
    model.save_pretrained(tmp_path / "fista")
    assert sorted(p.name for p in (tmp_path / "fista").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = SparseCoder.from_pretrained(tmp_path / "fista")
    assert loaded.l1_coeff == 0.02 and not loaded.dictionary.trainable
    assert torch.equal(loaded.encode(x), model.eval().encode(x))

    double = SparseCoder(create_encoder("topk", d_model=8, n_latents=16, k=3), Dictionary(16, 8)).double()
    double.save_pretrained(tmp_path / "double")
    assert json.loads((tmp_path / "double" / "config.json").read_text())["dtype"] == "float64"
    reloaded = SparseCoder.from_pretrained(tmp_path / "double")
    assert reloaded.dictionary.weight.dtype == torch.float64 and torch.equal(reloaded.encode(x.double()),
                                                                              double.encode(x.double()))

    head = load_encoder(tmp_path / "fista")
    other = Dictionary(16, 8, trainable=False)
    paired = SparseCoder(head, other)
    assert torch.equal(paired.encode(x), SparseCoder(model.encoder, other).encode(x))
    assert not torch.equal(paired.encode(x), model.encode(x))  # FISTA's codes depend on the dictionary


# ---- model cards ----

def test_card_command_writes_a_card_whose_metadata_parses_and_validates(tmp_path):
    run_dir = tiny_run(tmp_path, "run", "encoder.name=mlp", "encoder.hidden=16")
    assert main(["card", str(run_dir), "--repo-id", "carol/mlp"]) == 0
    card = ModelCard.load(run_dir / "README.md", ignore_metadata_errors=False)  # raises on bad metadata
    data = card.data.to_dict()
    assert data["library_name"] == "sae_zoo" and data["license"] == "apache-2.0"
    assert {"sae_zoo", "sparse-autoencoder", "encoder-mlp", "known-dictionary"} <= set(data["tags"])
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "mlp"
    test_metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert {r.metric_type: r.metric_value for r in results} == pytest.approx(test_metrics)
    assert all(r.dataset_split == "test" and r.dataset_type == "synthetic-sparse-codes" for r in results)
    for section in ("## Model", "## Usage", "## Training", "## Evaluation", "## Limitations"):
        assert section in card.text
    assert "encoder:\n  name: mlp" in card.text and "hidden: 16" in card.text  # the resolved recipe
    assert 'SparseCoder.from_pretrained("carol/mlp")' in card.text


# ---- bad input ----

@pytest.fixture
def saved(tmp_path) -> Path:
    atoms = generate_sparse_data(8, 16, 8, 3)[2]
    SparseCoder(create_encoder("linear", d_model=8, n_latents=16), Dictionary.from_tensor(atoms)).save_pretrained(
        tmp_path / "model")
    return tmp_path / "model"


def test_missing_weights_file_is_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SparseCoder.from_pretrained(saved)


def test_corrupt_weights_and_config_are_named(saved):
    (saved / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        SparseCoder.from_pretrained(saved)
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json: not a readable JSON file"):
        SparseCoder.from_pretrained(saved)


def test_config_naming_an_unknown_head(saved):
    config = json.loads((saved / "config.json").read_text())
    config["encoder"]["name"] = "no_such_head"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: 'encoder' cannot be built: unknown encoder 'no_such_head'; "
                                         r"registered encoders: .*linear"):
        SparseCoder.from_pretrained(saved)


def test_tensor_shapes_that_disagree_with_the_config(saved):
    config = json.loads((saved / "config.json").read_text())
    config["encoder"]["n_latents"] = config["dictionary"]["n_latents"] = 17
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '[a-z.]+weight' has shape \(16, 8\), "
                                         r"expected \(17, 8\) \(as config.json describes\)"):
        SparseCoder.from_pretrained(saved)


def test_a_dictionary_whose_width_differs_from_the_head(saved):
    with pytest.raises(ValueError, match=r"encoder 'linear' reads d_model=8, but the dictionary writes d_model=9; an SAE"):
        SparseCoder(load_encoder(saved), Dictionary(16, 9))
    with pytest.raises(ValueError, match=r"maps 8 -> 16 latents, but the dictionary has shape \(n_latents=12, d_model=8\)"):
        SparseCoder(load_encoder(saved), Dictionary(12, 8))


def test_repo_or_revision_that_does_not_exist(saved, hub):
    with pytest.raises(FileNotFoundError, match="Hub repo 'nobody/nothing' does not exist"):
        SparseCoder.from_pretrained("nobody/nothing")
    SparseCoder.from_pretrained(saved).push_to_hub("dave/sae")
    with pytest.raises(FileNotFoundError, match="revision 'v9' does not exist in Hub repo 'dave/sae'"):
        SparseCoder.from_pretrained("dave/sae", revision="v9")
    with pytest.raises(FileNotFoundError, match="no local folder 'no/such/dir' exists, and it is not a valid Hub repo id"):
        SparseCoder.from_pretrained("no/such/dir")
    with pytest.raises(TypeError, match="unexpected arguments encoder"):
        SparseCoder.from_pretrained(saved, encoder={"name": "mlp"})


def test_a_failed_save_leaves_no_half_written_files(saved, monkeypatch):
    import sae_zoo.pretrained.config as serialization

    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = SparseCoder(create_encoder("linear", d_model=8, n_latents=16), Dictionary(16, 8))

    def half_write_then_fail(tensors, path):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)  # over an existing save: it must survive intact
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved.parent / "new")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]  # no new dir, no staging left


def test_a_failed_push_changes_nothing_on_the_hub(saved, hub, monkeypatch):
    from sae_zoo.hub import push_model
    from sae_zoo.pretrained import card

    model = SparseCoder.from_pretrained(saved)
    monkeypatch.setattr(card, "template_text", lambda: (_ for _ in ()).throw(RuntimeError("template broken")))
    with pytest.raises(RuntimeError, match="template broken"):
        push_model(model, "erin/never-created")
    assert "erin/never-created" not in hub.repos  # saving failed before anything reached the Hub
    monkeypatch.undo()

    commit = model.push_to_hub("erin/sae")
    snapshot = dict(hub.repos["erin/sae"].commits[commit.oid])
    def reject(*args):
        raise HubError(422, None, "the server failed mid-commit")

    monkeypatch.setattr(hub, "commit", reject)
    with torch.no_grad():
        model.encoder.linear.weight.zero_()
    with pytest.raises(HfHubHTTPError, match="the server failed mid-commit"):
        model.push_to_hub("erin/sae")
    assert hub.repos["erin/sae"].branches["main"] == commit.oid
    assert hub.repos["erin/sae"].commits[commit.oid] == snapshot


def test_export_command_writes_a_saelens_sae_with_the_runs_codes(tmp_path, capsys):
    from sae_zoo.hub import load_sae

    run_dir = tiny_run(tmp_path, "linear")
    assert main(["export", str(run_dir), str(tmp_path / "sl"), "--hook-name", "h"]) == 0
    model, _, _ = load_run(run_dir)
    x = generate_sparse_data(32, 16, 8, 3, seed=2)[1]
    torch.testing.assert_close(load_sae(tmp_path / "sl").model().encode(x), model.encode(x), atol=1e-6, rtol=1e-6)
    assert main(["export", str(tiny_run(tmp_path, "mlp", "encoder.name=mlp")), str(tmp_path / "mlp")]) == 2
    assert "SAELens has no encoder like sae_zoo's 'mlp' head" in capsys.readouterr().err
    assert main(["card", str(tmp_path / "missing")]) == 2
    assert "has no config.yaml, model.ckpt, metrics.json" in capsys.readouterr().err
