"""Run directories (written by ``sae-zoo fit``) to model cards and Hub repos."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .._io import atomic_write_text
from ..model import SparseCoder
from ..pretrained.card import UNPUSHED_REPO_ID
from ..pretrained.config import CONFIG_NAME, WEIGHTS_NAME
from .transport import push_folder, push_model

RUN_FILES = ("config.yaml", "model.ckpt", "metrics.json")


def load_run(run_dir: str | Path) -> tuple[SparseCoder, dict[str, Any], dict[str, Any]]:
    """``(model, resolved recipe, metrics)`` of a run directory."""
    run_dir = Path(run_dir)
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} has no {', '.join(missing)}: is it a run directory written by sae-zoo fit?")
    try:
        recipe = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except Exception as e:
        raise ValueError(f"{run_dir}: cannot read config.yaml or metrics.json ({e})") from None
    try:
        model = SparseCoder.load_from_checkpoint(run_dir / "model.ckpt", map_location="cpu")
    except (RuntimeError, EOFError, OSError, KeyError) as e:  # torch's zip reader, a truncated pickle, ...
        raise ValueError(f"{run_dir / 'model.ckpt'}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    return model.eval(), recipe, metrics


def card_kwargs(recipe: dict[str, Any], metrics: dict[str, Any], repo_id: str | None = None) -> dict[str, Any]:
    return {"recipe": recipe, "metrics": metrics.get("test", {}), "repo_id": repo_id}


def write_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write ``run_dir/README.md``: the model card of the run's model. Returns its path."""
    model, recipe, metrics = load_run(run_dir)
    card = model.generate_model_card(**card_kwargs(recipe, metrics, repo_id))
    return atomic_write_text(Path(run_dir) / "README.md", str(card))


def push_run(run_dir: str | Path, repo_id: str, *, private: bool | None = None, branch: str | None = None,
             token: str | None = None, commit_message: str | None = None) -> Any:
    """Push a run's model with its card to ``repo_id``; returns the commit URL (``.oid`` is the commit). A
    saved model's folder (``save_pretrained``: ``config.json``, ``model.safetensors`` and its card, e.g. an
    upgrade's ``cards/NAME``) is checked by loading it, then uploaded as it is."""
    if all((Path(run_dir) / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        SparseCoder.from_pretrained(run_dir)  # a folder that does not load is not pushed
        with tempfile.TemporaryDirectory() as tmp:  # the card's usage snippets name the repo it goes to
            folder = Path(shutil.copytree(run_dir, Path(tmp) / "model"))
            card = folder / "README.md"
            if card.is_file():
                card.write_text(card.read_text().replace(f'"{UNPUSHED_REPO_ID}"', f'"{repo_id}"'))
            return push_folder(folder, repo_id, private=private, branch=branch, token=token,
                               commit_message=commit_message or f"Upload {Path(run_dir).name}")
    model, recipe, metrics = load_run(run_dir)
    return push_model(model, repo_id, private=private, branch=branch, token=token,
                      commit_message=commit_message or f"Upload {Path(run_dir).name}",
                      model_card_kwargs=card_kwargs(recipe, metrics, repo_id))
