"""Files: cache keys, atomic writes (write beside the target, then rename, so a failure never leaves half a file),
atomic folder replacement, and readers whose errors name the file at fault."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor


def cache_key(identity: Any) -> str:
    """The name of what ``identity`` (JSON-able) defines, in a cache: 16 hex digits of the sha256 of its JSON
    with sorted keys."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _remove_stale_staging(target: Path) -> None:
    """Remove the staging folders that killed saves to ``target`` left beside it: each is named after the
    process that made it (``.NAME.PID.XXXX.staging``), and is stale once that process is gone."""
    for leftover in target.parent.glob(f".{target.name}.*.staging"):
        pid = leftover.name[len(target.name) + 2:].split(".", 1)[0]
        if leftover.is_dir() and (not pid.isdigit() or not _pid_alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def _staging_folder(target: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".staging"))


@contextmanager
def atomic_directory(path: str | os.PathLike, replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; when the block succeeds, it replaces ``path`` whole.

    A new ``path`` appears in one rename. An existing folder is swapped with the staging folder in one
    atomic exchange (Linux), so a reader sees either the old files or the new ones, never a mix; where
    the kernel cannot exchange, the old folder is renamed aside first and removed after. On failure
    nothing changes, and the staging folders of saves that were killed are removed by the next save.
    ``replaces``: an existing non-empty folder is only replaced if it holds one of these files (an
    earlier save of the same kind), so that a mistyped path never wipes an unrelated folder.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    if replaces and target.is_dir() and any(target.iterdir()) and not any((target / n).exists() for n in replaces):
        raise FileExistsError(f"{target} is a non-empty folder without {' or '.join(replaces)}; refusing to replace "
                              "it: choose a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = _staging_folder(target)
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
        elif not _exchange(staging, target):
            aside = _staging_folder(target)
            os.replace(target, aside / "old")
            os.replace(staging, target)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_mapping(path: Path, parse: Callable[[str], Any], errors: tuple[type[Exception], ...], kind: str,
                  mapping: str) -> dict[str, Any]:
    try:
        value = parse(Path(path).read_text())
    except (OSError, UnicodeDecodeError, *errors) as e:
        raise ValueError(f"{path}: not a readable {kind} file ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a {kind} {mapping}, got {type(value).__name__}")
    return value


def read_json(path: Path) -> dict[str, Any]:
    return _read_mapping(path, json.loads, (json.JSONDecodeError,), "JSON", "object")


def read_yaml(path: Path) -> dict[str, Any]:
    return _read_mapping(path, yaml.safe_load, (yaml.YAMLError,), "YAML", "mapping")


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


def read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of a numpy ``.npz`` archive as float tensors (no pickled objects)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: torch.from_numpy(np.asarray(archive[name], dtype=np.float32)) for name in archive.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None


def require_keys(path: Path, mapping: dict[str, Any], keys: list[str], what: str = "key") -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{path}: missing {what}{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                         f"(found: {', '.join(sorted(map(str, mapping))) or 'none'})")


def check_shape(path: Path, name: str, tensor: Tensor, shape: tuple[int, ...], because: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} ({because})")
