"""Pushing to the Hugging Face Hub: the model is saved whole first, then the repo (and branch) are
made and the folder uploaded in one commit, so a model that fails to save leaves the Hub untouched."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, constants

from ..model import SparseCoder

#: the HTTP clients whose transport errors (no route, DNS, refused) mean the Hub cannot be reached
HTTP_CLIENTS = {"httpx", "httpx2", "requests", "urllib3"}


def push_model(model: SparseCoder, repo_id: str, *, private: bool | None = None, branch: str | None = None,
               token: str | None = None, commit_message: str = "Upload sae_zoo model",
               model_card_kwargs: dict[str, Any] | None = None) -> CommitInfo:
    """Save ``model``, then upload it in one commit to ``repo_id`` (created if needed) on ``branch``
    (created from main if needed). Returns the commit; its ``.oid`` pins this version for
    ``SparseCoder.from_pretrained(repo_id, revision=...)``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})})
        return push_folder(folder, repo_id, private=private, branch=branch, token=token, commit_message=commit_message)


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, branch: str | None = None,
                token: str | None = None, commit_message: str = "Upload sae_zoo model") -> CommitInfo:
    """Upload a saved model's folder as it is (its card included) in one commit, as :func:`push_model` does."""
    try:
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if branch not in (None, "main"):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=branch)
    except Exception as e:
        if type(e).__module__.split(".")[0] in HTTP_CLIENTS and not hasattr(e, "response"):
            raise ConnectionError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(e).__name__}: {e}); "
                                  "check the network, or set HF_ENDPOINT") from None
        raise
