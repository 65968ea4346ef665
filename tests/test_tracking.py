"""A recipe's ``loggers``: Lightning's own trackers beside the CSV log, checked like every other key."""

import csv
import struct

import pytest

from sae_zoo.recipe import RecipeError, fit, load_recipe

TINY = ["data.n_train=128", "data.n_test=128", "data.steps_per_epoch=20", "trainer.max_steps=40",
        "trainer.log_every_n_steps=10", "trainer.accelerator=cpu"]
RECIPE = "recipes/synthetic/known_dictionary.yaml"


def scalars(event_file, tag):
    """``{step: value}`` of one tag in a TensorBoard event file (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2
    values, data = {}, event_file.read_bytes()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + length])
        data = data[12 + length + 4:]
        values.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
    return values


def test_a_tensorboard_logger_writes_the_csv_logs_values_beside_it(tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    fit(load_recipe(RECIPE, [*TINY, "loggers=[tensorboard]", f"run_dir={run}"]), progress=False)
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 1 and (run / "logs" / "metrics.csv").exists()
    with open(run / "logs" / "metrics.csv") as f:
        logged = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]}
    assert len(logged) >= 3
    assert scalars(events[0], "train/loss") == pytest.approx(logged, rel=1e-6)


@pytest.mark.parametrize("loggers, message", [
    ("[tensorbord]", r"loggers\[0\]: unknown logger 'tensorbord'; choices: mlflow, tensorboard, wandb"),
    ("[{tensorboard: {flush_secs: 5, log_graf: true}}]", r"unknown key\(s\) loggers\[0\].tensorboard.log_graf"),
    ("[[tensorboard]]", r"loggers\[0\]: a logger name or \{name: \{options\}\}"),
])
def test_a_bad_logger_is_refused_by_name_before_anything_is_written(tmp_path, loggers, message):
    with pytest.raises(RecipeError, match=message):
        fit(load_recipe(RECIPE, [*TINY, f"loggers={loggers}", f"run_dir={tmp_path / 'run'}"]), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_wandb_logger_writes_an_offline_run_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    fit(load_recipe(RECIPE, [*TINY, "loggers=[{wandb: {project: sae-zoo-test, mode: offline}}]", f"run_dir={run}"]),
        progress=False)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
