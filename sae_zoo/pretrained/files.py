"""Find a file in a local folder or a Hugging Face Hub repo, with errors that say which one failed (and,
when a name is neither, that no local folder of that name exists either)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download, list_repo_files
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def _where(source: str, revision: str | None) -> str:
    return f"Hub repo {source!r}" + (f" at revision {revision!r}" if revision else "")


def is_local(source: str | Path) -> bool:
    return Path(source).is_dir()


def check_subfolder(subfolder: str | None) -> None:
    """A subfolder must stay inside its source: no absolute path, no ``..``."""
    if subfolder is not None and (Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
        raise ValueError(f"subfolder={subfolder!r} must be a relative path inside the source, without '..'")


def list_files(source: str | Path, *, subfolder: str | None = None, revision: str | None = None,
               token: str | bool | None = None) -> list[str]:
    """File names (relative to ``subfolder``) in a local directory or a Hub repo."""
    check_subfolder(subfolder)
    if is_local(source):
        root = Path(source) / (subfolder or "")
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        return sorted(p.name for p in root.iterdir() if p.is_file())
    try:
        files = list_repo_files(str(source), revision=revision, token=token)
    except Exception as e:
        raise _hub_error(e, str(source), revision) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])


def resolve_file(source: str | Path, filename: str, *, subfolder: str | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, force_download: bool = False, token: str | bool | None = None,
                 local_files_only: bool = False) -> Path:
    """``source/subfolder/filename`` on disk, downloading it from the Hub when ``source`` is a repo id."""
    check_subfolder(subfolder)
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
    no_folder = f"no local folder {repo_id!r} exists either"
    if isinstance(error, HFValidationError):
        return FileNotFoundError(f"no local folder {repo_id!r} exists, and it is not a valid Hub repo id")
    if isinstance(error, RevisionNotFoundError):
        return FileNotFoundError(f"revision {revision!r} does not exist in Hub repo {repo_id!r}")
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(f"Hub repo {repo_id!r} does not exist (or is private and no token allows it), "
                                 f"and {no_folder}")
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return FileNotFoundError(f"{where} is not in the local cache and the Hub cannot be reached (offline), and "
                                 f"{no_folder}")
    if isinstance(error, EntryNotFoundError):
        return FileNotFoundError(f"{where} has no file {filename!r}")
    return error
