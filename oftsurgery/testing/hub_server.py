"""A local stand-in for the Hugging Face Hub's *write* API, on 127.0.0.1, for tests and the demo.

`LocalHub` answers what huggingface_hub sends for `create_repo` + `upload_folder` over the plain LFS
path, checks tokens, namespaces, which files must go through LFS (`UploadModeRule`) and every LFS
object's sha256, and stores what arrives as plain files; `fail()` / `stall()` make endpoints misbehave.
Run it standalone: `python -m oftsurgery.testing.hub_server --token hf_local_demo --user demo`.
The endpoints and the checks: docs/push.md ("Trying it without the Hub").
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

ENDPOINTS = (
    "create_repo",
    "validate_yaml",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "commit",
    "repo_info",
    "create_branch",
    "whoami",
)

# LFS patterns the Hub writes into a new repo's .gitattributes (the subset relevant to models).
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
    "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*",
    "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
REGULAR_FILE_LIMIT = 10 * 1024 * 1024  # the Hub refuses inline files above 10 MiB
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def gitattributes_text(patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS) -> str:
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns)


def lfs_patterns_from_gitattributes(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as the oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class UploadModeRule:
    """The Hub's rule for which files must be stored through LFS; `mode()` applies it."""

    max_regular_size: int = REGULAR_FILE_LIMIT
    binary_is_lfs: bool = True

    def mode(self, path: str, size: int, sample: bytes, lfs_patterns: list[str]) -> str:
        if _matches_any(path, lfs_patterns):
            return "lfs"
        if size > self.max_regular_size:
            return "lfs"
        if self.binary_is_lfs and b"\x00" in sample:
            return "lfs"
        return "regular"


def _matches_any(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(path, pattern.replace("**/", "*")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


@dataclass(frozen=True)
class StoredFile:
    """A file as committed: how it was sent (`mode`), its size and content hashes."""

    path: str
    mode: str  # "regular" or "lfs"
    size: int
    sha256: str


@dataclass(frozen=True)
class Commit:
    oid: str
    summary: str
    parent: str | None
    changes: dict[str, str]  # path -> "regular" | "lfs" | "deleted"


@dataclass
class HostedRepo:
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)
    files: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    upload_modes: dict[str, str] = field(default_factory=dict)  # path -> mode last decided by preupload
    pull_requests: int = 0


@dataclass
class InjectedFailure:
    endpoint: str
    status: int  # STALL: read the request and never answer
    remaining: int | None  # None: every matching request fails
    error_code: str | None
    message: str


@dataclass(frozen=True)
class RecordedRequest:
    endpoint: str
    method: str
    path: str
    status: int


class _HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.extra = extra or {}


STALL = 0  # InjectedFailure.status of a request the server accepts and never answers


class LocalHub:
    """A Hub write-API server on a free 127.0.0.1 port, with its storage in a directory.

    >>> with LocalHub(tokens={"hf_secret": "alice"}) as hub:          # doctest: +SKIP
    ...     HfApi(endpoint=hub.url, token="hf_secret").create_repo("alice/model")
    """

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        root: str | Path | None = None,
        rule: UploadModeRule | None = None,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
    ):
        self.tokens = dict(tokens if tokens is not None else {"hf_local_token": "local"})
        self.rule = rule or UploadModeRule()
        self.lfs_patterns = tuple(lfs_patterns)
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="oftsurgery-localhub-"))
        self.repos: dict[str, HostedRepo] = {}
        self.requests: list[RecordedRequest] = []
        self._grants: dict[str, set[str]] = {}
        self._failures: list[InjectedFailure] = []
        self._pending_lfs: dict[str, tuple[int, str]] = {}  # oid -> (size, ticket)
        self._lock = threading.RLock()
        self._stopping = threading.Event()  # releases stalled requests
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- configuration --------------------------------------------------------------------------
    def grant(self, user: str, namespace: str) -> None:
        """Let `user` write to repos of `namespace` (an organisation they belong to)."""
        self._grants.setdefault(user, set()).add(namespace)

    def fail(
        self,
        endpoint: str,
        status: int,
        *,
        times: int | None = None,
        error_code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Make the next `times` requests to `endpoint` (all of them if None) answer `status`."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        if error_code is None and status == 404:
            error_code = "RepoNotFound"
        with self._lock:
            self._failures.append(
                InjectedFailure(endpoint, status, times, error_code, message or f"Injected failure {status} on {endpoint}")
            )

    def stall(self, endpoint: str, *, times: int | None = None) -> None:
        """Make the next `times` requests to `endpoint` (all if None) hang: the server reads them and
        never answers (until it stops), like a Hub behind a broken proxy."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        with self._lock:
            self._failures.append(InjectedFailure(endpoint, STALL, times, None, "stalled"))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    # -- inspection -----------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        with self._lock:
            return dict(self.repos[repo_id].files[revision])

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self._tree(repo_id, revision).joinpath(path).read_bytes()

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        with self._lock:
            return list(self.repos[repo_id].branches[revision])

    def upload_modes(self, repo_id: str) -> dict[str, str]:
        """The regular/LFS decision the preupload endpoint last gave for each path."""
        with self._lock:
            return dict(self.repos[repo_id].upload_modes)

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def lfs_patterns_of(self, repo_id: str, revision: str = "main") -> list[str]:
        tree = self._tree(repo_id, revision)
        attributes = tree / ".gitattributes"
        return lfs_patterns_from_gitattributes(attributes.read_text()) if attributes.is_file() else []

    # -- storage --------------------------------------------------------------------------------
    def _tree(self, repo_id: str, revision: str) -> Path:
        return self.root / "repos" / repo_id / quote(revision, safe="")

    def _lfs_path(self, oid: str) -> Path:
        return self.root / "lfs-objects" / oid

    # -- request handling (called from handler threads) -----------------------------------------
    def _take_failure(self, endpoint: str) -> InjectedFailure | None:
        with self._lock:
            for failure in self._failures:
                if failure.endpoint == endpoint and (failure.remaining is None or failure.remaining > 0):
                    if failure.remaining is not None:
                        failure.remaining -= 1
                    return failure
        return None

    def _user(self, authorization: str | None) -> str:
        token = authorization[7:].strip() if authorization and authorization.startswith("Bearer ") else None
        user = self.tokens.get(token) if token else None
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return user

    def _may_write(self, user: str, namespace: str) -> bool:
        return namespace == user or namespace in self._grants.get(user, set())

    def _readable_repo(self, user: str, repo_id: str) -> HostedRepo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._may_write(user, repo_id.split("/")[0])):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, user: str, repo_id: str) -> HostedRepo:
        repo = self._readable_repo(user, repo_id)
        if not self._may_write(user, repo_id.split("/")[0]):
            raise _HubError(403, f"You don't have write access to {repo_id}")
        return repo

    def _new_commit(self, repo: HostedRepo, revision: str, summary: str, changes: dict[str, str]) -> Commit:
        history = repo.branches.setdefault(revision, [])
        parent = history[-1].oid if history else None
        self._commit_counter += 1
        material = json.dumps([repo.repo_id, revision, parent, summary, changes, self._commit_counter], sort_keys=True)
        commit = Commit(hashlib.sha1(material.encode()).hexdigest(), summary, parent, changes)
        history.append(commit)
        return commit

    def create_repo(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        name, namespace = body.get("name"), body.get("organization") or user
        if body.get("type") not in (None, "model"):
            raise _HubError(400, "Only model repositories are supported by this local Hub")
        repo_id = f"{namespace}/{name}"
        if not isinstance(name, str) or not _REPO_ID.match(repo_id):
            raise _HubError(400, f"Invalid repository name {repo_id!r}")
        if not self._may_write(user, namespace):
            raise _HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        private = body.get("visibility", "public") != "public" if "visibility" in body else bool(body.get("private"))
        with self._lock:
            if repo_id in self.repos:
                # the Hub answers a conflict with the existing repo's url, which the client reads
                raise _HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            repo = HostedRepo(repo_id, owner=user, private=private)
            self.repos[repo_id] = repo
            attributes = gitattributes_text(self.lfs_patterns).encode()
            tree = self._tree(repo_id, "main")
            tree.mkdir(parents=True)
            (tree / ".gitattributes").write_bytes(attributes)
            repo.files["main"] = {
                ".gitattributes": StoredFile(".gitattributes", "regular", len(attributes), hashlib.sha256(attributes).hexdigest())
            }
            self._new_commit(repo, "main", "initial commit", {".gitattributes": "regular"})
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, user: str, repo_id: str, revision: str) -> dict[str, Any]:
        with self._lock:
            repo = self._readable_repo(user, repo_id)
            if revision not in repo.branches:
                raise _HubError(404, f"Revision {revision} not found", "RevisionNotFound")
            return {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.branches[revision][-1].oid,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(repo.files[revision])],
            }

    def create_branch(self, user: str, repo_id: str, branch: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            repo = self._writable_repo(user, repo_id)
            if branch in repo.branches:
                raise _HubError(409, f"Branch {branch} already exists")
            start = body.get("startingPoint") or "main"
            if start not in repo.branches:
                raise _HubError(404, f"Revision {start} not found", "RevisionNotFound")
            self._copy_revision(repo, start, branch)
        return {}

    def _copy_revision(self, repo: HostedRepo, source: str, target: str) -> None:
        shutil.copytree(self._tree(repo.repo_id, source), self._tree(repo.repo_id, target))
        repo.files[target] = dict(repo.files[source])
        repo.branches[target] = list(repo.branches[source])

    def preupload(self, user: str, repo_id: str, revision: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            repo = self._writable_repo(user, repo_id)
            if revision not in repo.branches:
                raise _HubError(404, f"Revision {revision} not found", "RevisionNotFound")
            current = repo.files[revision]
            patterns = self.lfs_patterns_of(repo_id, revision)
            answers = []
            for entry in body.get("files", []):
                path, size = entry["path"], int(entry["size"])
                sample = base64.b64decode(entry.get("sample", ""))
                mode = self.rule.mode(path, size, sample, patterns)
                repo.upload_modes[path] = mode
                existing = current.get(path)
                oid = None
                if existing is not None and existing.mode == mode:
                    oid = existing.sha256 if mode == "lfs" else git_blob_oid(self.read(repo_id, path, revision))
                answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answers, "commitOid": repo.branches[revision][-1].oid}

    def lfs_batch(self, user: str, repo_id: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._writable_repo(user, repo_id)
            if body.get("operation") != "upload":
                raise _HubError(400, "Only LFS uploads are supported")
            objects = []
            for obj in body.get("objects", []):
                oid, size = str(obj["oid"]), int(obj["size"])
                if not re.fullmatch(r"[0-9a-f]{64}", oid):
                    objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
                elif self._lfs_path(oid).is_file():
                    objects.append({"oid": oid, "size": size})  # already stored: no upload action
                else:
                    ticket = self._pending_lfs.get(oid, (size, secrets.token_hex(16)))[1]
                    self._pending_lfs[oid] = (size, ticket)
                    href = f"{self.url}/lfs-upload/{oid}?ticket={ticket}"
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": {"href": href}}})
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_upload(self, oid: str, ticket: str, data: bytes) -> None:
        with self._lock:
            pending = self._pending_lfs.get(oid)
        if pending is None or pending[1] != ticket:
            raise _HubError(403, "Unknown or expired LFS upload URL")
        size, _ = pending
        if len(data) != size:
            raise _HubError(400, f"LFS object {oid} has {len(data)} bytes, {size} were announced")
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HubError(400, f"LFS object content does not match its oid {oid}")
        target = self._lfs_path(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{oid}.{secrets.token_hex(4)}.partial")
        partial.write_bytes(data)
        partial.replace(target)
        with self._lock:
            self._pending_lfs.pop(oid, None)

    def commit(self, user: str, repo_id: str, revision: str, lines: list[dict[str, Any]], create_pr: bool) -> dict[str, Any]:
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "A commit must start with a header line")
        header = lines[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise _HubError(400, "A commit needs a summary")
        with self._lock:
            repo = self._writable_repo(user, repo_id)
            if revision not in repo.branches:
                raise _HubError(404, f"Revision {revision} not found", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and not repo.branches[revision][-1].oid.startswith(parent):
                raise _HubError(412, "The parent commit is not the head of the revision")
            patterns = self.lfs_patterns_of(repo_id, revision)
            writes: dict[str, tuple[str, bytes | Path]] = {}
            deletions: list[str] = []
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise _HubError(400, f"Invalid path {path!r} in commit")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if self.rule.mode(path, len(data), data[:512], patterns) == "lfs" and data:
                        raise _HubError(400, f"{path} must be stored with LFS (binary, large, or tracked by .gitattributes)")
                    writes[path] = ("regular", data)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    stored = self._lfs_path(oid)
                    if not stored.is_file():
                        raise _HubError(422, f"LFS object {oid} for {path} was never uploaded")
                    if "size" in value and int(value["size"]) != stored.stat().st_size:
                        raise _HubError(422, f"LFS object {oid} for {path} has a different size")
                    writes[path] = ("lfs", stored)
                elif key in ("deletedFile", "deletedFolder"):
                    deletions.append(path.rstrip("/"))
                else:
                    raise _HubError(400, f"Unsupported commit operation {key!r}")
            if create_pr:
                repo.pull_requests += 1
                pr_number = repo.pull_requests
                target = f"refs/pr/{pr_number}"
                self._copy_revision(repo, revision, target)
            else:
                pr_number, target = None, revision
            changes = self._apply(repo, target, writes, deletions)
            commit = self._new_commit(repo, target, summary, changes)
        answer: dict[str, Any] = {
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "success": True,
        }
        if pr_number is not None:
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{pr_number}"
        return answer

    def _apply(self, repo: HostedRepo, revision: str, writes: dict[str, tuple[str, Any]], deletions: list[str]) -> dict[str, str]:
        tree = self._tree(repo.repo_id, revision)
        files = repo.files[revision]
        changes: dict[str, str] = {}
        for prefix in deletions:
            for path in [p for p in files if p == prefix or p.startswith(prefix + "/")]:
                (tree / path).unlink()
                del files[path]
                changes[path] = "deleted"
        for path, (mode, source) in writes.items():
            target = tree / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, target)
            else:
                target.write_bytes(source)
            data = target.read_bytes()
            files[path] = StoredFile(path, mode, len(data), hashlib.sha256(data).hexdigest())
            changes[path] = mode
        return changes


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """Check a README's YAML front matter the way the Hub's validate-yaml endpoint does (errors, warnings)."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if match is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in front matter: {exc}"], []
    if meta is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["The front matter must be a YAML mapping"], []
    errors = []
    base = meta.get("base_model")
    bases = [base] if isinstance(base, str) else base
    if base is not None and (
        not isinstance(bases, list) or not all(isinstance(b, str) and _REPO_ID.match(b) for b in bases)
    ):
        errors.append(f"base_model must be a Hub model id or a list of them, got {base!r}")
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            errors.append(f"base_model_relation must be one of {', '.join(BASE_MODEL_RELATIONS)}, got {relation!r}")
        if base is None:
            errors.append("base_model_relation needs base_model")
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append("tags must be a list of strings")
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append("library_name must be a string")
    return errors, []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    # Route table: (method, regex on the raw path, endpoint name). Path segments are URL-quoted.
    ROUTES = (
        ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        ("POST", re.compile(r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/preupload/(?P<rev>[^/]+)$"), "preupload"),
        ("POST", re.compile(r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/commit/(?P<rev>[^/]+)$"), "commit"),
        ("POST", re.compile(r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/branch/(?P<rev>[^/]+)$"), "create_branch"),
        ("GET", re.compile(r"^/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)(/revision/(?P<rev>[^/]+))?$"), "repo_info"),
        ("POST", re.compile(r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch$"), "lfs_batch"),
        ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
        ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    )

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the request log instead
        logger.debug("localhub: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = self._read_body()
        endpoint, match = "unknown", None
        for route_method, pattern, name in self.ROUTES:
            match = pattern.match(split.path) if route_method == method else None
            if match:
                endpoint = name
                break
        status, payload, headers = 200, {}, {}
        try:
            if match is None:
                raise _HubError(404, f"No route for {method} {split.path}")
            failure = self.hub._take_failure(endpoint)
            if failure is not None and failure.status == STALL:
                with self.hub._lock:
                    self.hub.requests.append(RecordedRequest(endpoint, method, split.path, STALL))
                self.hub._stopping.wait()
                self.close_connection = True
                return
            if failure is not None:
                raise _HubError(failure.status, failure.message, failure.error_code)
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            payload = self._handle(endpoint, params, query, body) or {}
        except _HubError as exc:
            status, payload = exc.status, {"error": exc.message, **exc.extra}
            if isinstance(exc, _ValidationFailed):
                payload["errors"] = [{"message": e} for e in exc.errors]
                payload["warnings"] = [{"message": w} for w in exc.warnings]
            headers["X-Error-Message"] = exc.message
            if exc.error_code:
                headers["X-Error-Code"] = exc.error_code
        except Exception as exc:  # a bug in the server: answer 500 instead of hanging the client
            logger.exception("localhub: %s failed", endpoint)
            status, payload = 500, {"error": f"internal error: {type(exc).__name__}"}
        with self.hub._lock:
            self.hub.requests.append(RecordedRequest(endpoint, method, split.path, status))
        self._send(status, payload, headers)

    def _handle(self, endpoint: str, params: dict[str, str], query: dict[str, str], body: bytes) -> dict[str, Any] | None:
        hub = self.hub
        if endpoint == "lfs_upload":  # pre-signed URL: the ticket is the credential, like an S3 link
            hub.lfs_upload(params["oid"], query.get("ticket", ""), body)
            return None
        user = hub._user(self.headers.get("Authorization"))
        repo_id = f"{params['ns']}/{params['name']}" if "ns" in params else ""
        if endpoint == "whoami":
            return {"name": user, "type": "user", "auth": {"type": "access_token"}}
        if endpoint == "validate_yaml":
            errors, warnings = validate_card_metadata(json.loads(body or b"{}").get("content", ""))
            if errors:
                raise _ValidationFailed(errors, warnings)
            return {"errors": [], "warnings": [{"message": w} for w in warnings]}
        if endpoint == "create_repo":
            return hub.create_repo(user, json.loads(body or b"{}"))
        if endpoint == "repo_info":
            return hub.repo_info(user, repo_id, params.get("rev", "main"))
        if endpoint == "create_branch":
            return hub.create_branch(user, repo_id, params["rev"], json.loads(body or b"{}"))
        if endpoint == "preupload":
            return hub.preupload(user, repo_id, params["rev"], json.loads(body or b"{}"))
        if endpoint == "lfs_batch":
            return hub.lfs_batch(user, repo_id, json.loads(body or b"{}"))
        if endpoint == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            return hub.commit(user, repo_id, params["rev"], lines, create_pr=query.get("create_pr") == "1")
        raise _HubError(404, f"No handler for {endpoint}")

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class _ValidationFailed(_HubError):
    """validate-yaml answers 400 with the list of errors in its body."""

    def __init__(self, errors: list[str], warnings: list[str]):
        super().__init__(400, "; ".join(errors))
        self.errors, self.warnings = errors, warnings


def main(argv: list[str] | None = None) -> None:
    """Serve a LocalHub until interrupted (for the demo or trying `oftsurgery push --endpoint`)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="A local Hugging Face Hub write-API stand-in on 127.0.0.1.")
    parser.add_argument("--token", default="hf_local_token", help="the bearer token clients must send")
    parser.add_argument("--user", default="local", help="the user that token belongs to (its namespace)")
    parser.add_argument("--root", default=None, help="where to store pushed files (default: a temp dir, removed on exit)")
    args = parser.parse_args(argv)
    with LocalHub(tokens={args.token: args.user}, root=args.root) as hub:
        print(f"Local Hub at {hub.url} storing under {hub.root}; push to {args.user}/NAME. Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
