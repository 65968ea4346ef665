"""Find a file in a local directory or a Hugging Face Hub repo, with errors that say which one failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor


def _where(source: str, revision: str | None) -> str:
    return f"Hub repo {source!r}" + (f" at revision {revision!r}" if revision else "")


def is_local(source: str | Path) -> bool:
    return Path(source).is_dir()


def list_files(source: str | Path, *, subfolder: str | None = None, revision: str | None = None,
               token: str | bool | None = None) -> list[str]:
    """File names (relative to ``subfolder``) in a local directory or a Hub repo."""
    if is_local(source):
        root = Path(source) / (subfolder or "")
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        return sorted(p.name for p in root.iterdir() if p.is_file())
    try:
        files = HfApi(token=token).list_repo_files(str(source), revision=revision)
    except Exception as e:
        raise _hub_error(e, str(source), revision) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])


def resolve_file(source: str | Path, filename: str, *, subfolder: str | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, force_download: bool = False, token: str | bool | None = None,
                 local_files_only: bool = False) -> Path:
    """``source/subfolder/filename`` on disk, downloading it from the Hub when ``source`` is a repo id."""
    if is_local(source):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {source} is a local directory")
        path = Path(source) / (subfolder or "") / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return path
    try:
        return Path(hf_hub_download(str(source), filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, token=token, local_files_only=local_files_only))
    except Exception as e:
        name = f"{subfolder}/{filename}" if subfolder else filename
        raise _hub_error(e, str(source), revision, name) from None


def _hub_error(error: Exception, repo_id: str, revision: str | None, filename: str | None = None) -> Exception:
    where = _where(repo_id, revision)
    if isinstance(error, HFValidationError):
        return FileNotFoundError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id ({error})")
    if isinstance(error, RevisionNotFoundError):
        return FileNotFoundError(f"revision {revision!r} does not exist in Hub repo {repo_id!r}")
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(f"Hub repo {repo_id!r} does not exist (or is private and no token allows it)")
    if isinstance(error, EntryNotFoundError):
        return FileNotFoundError(f"{where} has no file {filename!r}")
    return error


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_torch_state(path: Path) -> dict[str, Tensor]:
    """A ``torch.save``d state dict, loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a corrupt file
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def require_keys(path: Path, mapping: dict[str, Any], keys: list[str], what: str = "key") -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{path}: missing {what}{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                         f"(found: {', '.join(sorted(map(str, mapping))) or 'none'})")


def check_shape(path: Path, name: str, tensor: Tensor, shape: tuple[int, ...], because: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} ({because})")
