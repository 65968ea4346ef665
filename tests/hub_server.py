"""A Hugging Face Hub stand-in on 127.0.0.1 for tests, in the standard library only.

It serves what the real ``huggingface_hub`` client calls for the features sae_zoo uses, with the
Hub's status codes and ``X-Error-Code`` headers, so the client raises its usual errors:

* ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``
* ``POST /api/validate-yaml`` (checks that a card's metadata block is closed; the real Hub checks more)
* ``POST /api/models/{repo}/preupload/{rev}`` (every file "regular": inlined in the commit, no LFS/Xet)
* ``POST /api/models/{repo}/commit/{rev}`` (an NDJSON commit: header, file, deletedFile, deletedFolder)
* ``GET /api/models/{repo}[/revision/{rev}]`` and ``GET /api/models/{repo}/tree/{rev}[/{path}]``
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag``

Repos live in memory as commits (full snapshots) and branches; a revision is a branch or a commit id.
Start it with ``LoopbackHub()``, which is a context manager and has ``.url``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "sae-zoo-tester"


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, body: dict | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body
        self.headers = headers or {}


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # name -> oid

    def resolve(self, revision: str) -> tuple[str, dict[str, bytes]]:
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return oid, self.commits[oid]


def blob_oid(content: bytes) -> str:
    """Git's blob id, which the Hub serves as the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LoopbackHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self._counter = itertools.count()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "LoopbackHub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- repository state ---

    def _new_commit(self, repo: Repo, files: dict[str, bytes], message: str) -> str:
        oid = hashlib.sha1(f"{repo.repo_id}\0{next(self._counter)}\0{message}".encode()).hexdigest()
        repo.commits[oid] = files
        return oid

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
        return repo

    def serve(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` (path in the repo -> content) as the main branch of a public repo ``repo_id``, which
        it replaces; returns the commit id. For repos laid out like real ones, under their real names."""
        with self.lock:
            repo = Repo(repo_id, private=False)
            repo.branches["main"] = self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n", **files},
                                                     "upload")
            self.repos[repo_id] = repo
        return repo.branches["main"]

    # --- endpoints: (status, headers, body) ---

    def create_repo(self, payload: dict) -> tuple[int, dict, bytes]:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, None, "You already created this model repo", {"error": "You already created this "
                                                                                   "model repo", "url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.branches["main"] = self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial")
        self.repos[repo_id] = repo
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, repo: Repo, branch: str, payload: dict) -> tuple[int, dict, bytes]:
        if branch in repo.branches:
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch], _ = repo.resolve(payload.get("startingPoint") or "main")
        return _json({})

    def commit(self, repo: Repo, revision: str, body: bytes) -> tuple[int, dict, bytes]:
        if revision not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.commits[repo.branches[revision]])
        message = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, None, f"unsupported file encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile: never asked for, preupload answers "regular"
                raise HubError(400, None, f"this test Hub takes no {key!r} operations")
        oid = self._new_commit(repo, files, message)
        repo.branches[revision] = oid
        return _json({"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                      "pullRequestUrl": None})

    def info(self, repo: Repo, revision: str) -> tuple[int, dict, bytes]:
        oid, files = repo.resolve(revision)
        return _json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": oid, "private": repo.private,
                      "siblings": [{"rfilename": p} for p in sorted(files)]})

    def tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> tuple[int, dict, bytes]:
        _, files = repo.resolve(revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for i, _ in enumerate(rest.split("/")[:-1]):
                folders.add(prefix + "/".join(rest.split("/")[: i + 1]))
            entries.append({"type": "file", "path": name, "size": len(files[name]), "oid": blob_oid(files[name])})
        if prefix and not entries and not folders:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return _json(entries)

    def resolve_file(self, repo: Repo, revision: str, path: str, head: bool) -> tuple[int, dict, bytes]:
        oid, files = repo.resolve(revision)
        if path not in files:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", headers={"X-Repo-Commit": oid})
        content = files[path]
        headers = {"X-Repo-Commit": oid, "ETag": f'"{blob_oid(content)}"', "Content-Length": str(len(content)),
                   "Content-Type": "application/octet-stream"}
        return 200, headers, b"" if head else content

    def validate_yaml(self, payload: dict) -> tuple[int, dict, bytes]:
        content = payload.get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            raise HubError(400, None, "Invalid metadata: the YAML block opened by '---' is never closed")
        return _json({"errors": [], "warnings": []})

    # --- HTTP plumbing ---

    def route(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        authorized = headers.get("authorization", "").startswith("Bearer ")
        if method == "POST" and not authorized and parts != ["api", "validate-yaml"]:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        with self.lock:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self.create_repo(json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self.validate_yaml(json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = self._repo("/".join(parts[2:4]), authorized)
                action, rest = (parts[4], parts[5:]) if len(parts) > 4 else (None, [])
                if method == "GET" and action is None:
                    return self.info(repo, "main")
                if method == "GET" and action == "revision" and rest:
                    return self.info(repo, rest[0])
                if method == "GET" and action == "tree" and rest:
                    return self.tree(repo, rest[0], "/".join(rest[1:]), query.get("recursive", [""])[0].lower() == "true")
                if method == "POST" and action == "preupload" and rest:
                    repo.resolve(rest[0])
                    files = json.loads(body)["files"]
                    return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                            for f in files]})
                if method == "POST" and action == "commit" and rest:
                    if query.get("create_pr"):
                        raise HubError(400, None, "this test Hub does not open pull requests")
                    return self.commit(repo, rest[0], body)
                if method == "POST" and action == "branch" and rest:
                    return self.create_branch(repo, rest[0], json.loads(body or b"{}"))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo("/".join(parts[:2]), authorized)
                return self.resolve_file(repo, parts[3], "/".join(parts[4:]), head=method == "HEAD")
        raise HubError(404, None, f"no route for {method} {path}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

            def _serve(self, method: str) -> None:
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    status, headers, payload = hub.route(method, url.path, parse_qs(url.query),
                                                         {k.lower(): v for k, v in self.headers.items()}, body)
                except HubError as e:
                    status, payload = e.status, json.dumps(e.body or {"error": e.message}).encode()
                    headers = {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                               "X-Error-Message": e.message, **e.headers}
                    if e.code:
                        headers["X-Error-Code"] = e.code
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_HEAD(self) -> None:
                self._serve("HEAD")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler


def _json(value: object) -> tuple[int, dict, bytes]:
    payload = json.dumps(value).encode()
    return 200, {"Content-Type": "application/json", "Content-Length": str(len(payload))}, payload

