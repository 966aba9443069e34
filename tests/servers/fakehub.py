"""A Hub-compatible test server: the HTTP protocol `huggingface_hub` 2.x speaks for model
repos (create, info, tree, preupload, classic LFS batch/upload/verify, NDJSON commit,
resolve), as a WSGI app run on 127.0.0.1 by the `fake_hub` fixture.

It keeps a commit history per repo in memory and LFS blobs on disk by sha256, checks a
bearer token on writes the way the Hub does (the LFS PUT, validate-yaml and the
telemetry call carry no token), and logs every request so tests can assert on traffic.
Xet is not implemented: clients must run with `HF_HUB_DISABLE_XET`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import yaml

# ref: the Hub stores files of 10 MB and more, or binary files, with LFS.
LFS_THRESHOLD = 10 * 1000 * 1000
BINARY_SUFFIXES = (".gguf", ".bin", ".safetensors", ".pt", ".onnx", ".npz", ".zip", ".tar")
GITATTRIBUTES = (
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"

StartResponse = Callable[..., Any]


def git_blob_sha1(data: bytes) -> str:
    # ref: git hash-object: sha1("blob <size>\0" + content)
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    # ref: git-lfs spec, pointer file format
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class FileSlice:
    """Part of a stored file sent in chunks (never read whole): `source` is a blob path or
    the bytes of a regular file."""

    source: Path | bytes
    start: int
    length: int
    key: tuple[str, str]

    def stream(self, hub: FakeHub) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            chunks: Iterable[bytes] = [self.source[self.start:self.start + self.length]]
        else:
            chunks = self._read_file(self.source)
        for chunk in chunks:
            with hub._lock:
                hub.bytes_served[self.key] = hub.bytes_served.get(self.key, 0) + len(chunk)
            yield chunk

    def _read_file(self, path: Path) -> Iterator[bytes]:
        left = self.length
        with open(path, "rb") as fh:
            fh.seek(self.start)
            while left > 0:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk


@dataclass(frozen=True)
class Entry:
    size: int
    blob_id: str  # git blob sha1 of the content (regular) or of the pointer (LFS)
    lfs_sha256: str | None = None
    content: bytes | None = None  # regular files only


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    head: str = ""

    @property
    def files(self) -> dict[str, Entry]:
        return self.commits[self.head].files


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.body = body


_STATUS = {
    200: "OK",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    416: "Range Not Satisfiable",
    422: "Unprocessable Entity",
    501: "Not Implemented",
}


class FakeHub:
    """The WSGI app. `url` is set by `serve()`; `requests` logs (method, path, auth?)."""

    def __init__(self, storage_dir: Path, *, token: str | None = None, user: str = "tester"):
        self.storage = Path(storage_dir)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        # bytes of file content sent by resolve, per (repo, file): what a client downloaded
        self.bytes_served: dict[tuple[str, str], int] = {}
        self.url = "http://hub.test"
        self._lock = threading.RLock()

    # -- plumbing ----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = unquote(environ.get("PATH_INFO", ""))
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        with self._lock:
            self.requests.append((method, path))
        try:
            status, headers, payload = self._route(method, path, query, body, environ)
        except HttpError as err:
            status = err.status
            headers = [("Content-Type", "application/json"), ("X-Error-Message", err.message)]
            if err.code:
                headers.append(("X-Error-Code", err.code))
            payload = json.dumps(
                err.body if err.body is not None else {"error": err.message}
            ).encode()
        if isinstance(payload, FileSlice):
            headers.append(("Content-Length", str(payload.length)))
            start_response(f"{status} {_STATUS.get(status, 'Status')}", headers)
            return [] if method == "HEAD" else payload.stream(self)
        if isinstance(payload, dict | list):
            payload = json.dumps(payload).encode()
            if not any(k == "Content-Type" for k, _ in headers):
                headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(payload))))
        start_response(f"{status} {_STATUS.get(status, 'Status')}", headers)
        return [b"" if method == "HEAD" else payload]

    def _auth(self, environ: dict[str, Any], *, required: bool) -> None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header:
            if required and self.token is not None:
                raise HttpError(401, BAD_TOKEN_MESSAGE)
            return
        if self.token is not None and header != f"Bearer {self.token}":
            raise HttpError(401, BAD_TOKEN_MESSAGE)

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        if rev == "main":
            return repo.commits[repo.head]
        if rev in repo.commits:
            return repo.commits[rev]
        raise HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    def _blob_path(self, sha256: str) -> Path:
        return self.storage / "lfs" / sha256

    # -- routing -----------------------------------------------------------------------

    def _route(
        self, method: str, path: str, query: dict[str, str], body: bytes, env: dict[str, Any]
    ) -> tuple[int, list[tuple[str, str]], Any]:
        repo_re = r"(?P<repo>[\w.-]+/[\w.-]+)"
        routes: list[tuple[str, str, Callable[..., Any], bool]] = [
            ("GET", r"/api/agent-harnesses", self._harnesses, False),
            ("GET", r"/api/whoami-v2", self._whoami, True),
            ("POST", r"/api/validate-yaml", self._validate_yaml, False),
            ("POST", r"/api/repos/create", self._create_repo, True),
            ("GET", rf"/api/models/{repo_re}/revision/(?P<rev>[^/]+)", self._info, False),
            (
                "GET",
                rf"/api/models/{repo_re}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?",
                self._tree,
                False,
            ),
            ("GET", rf"/api/models/{repo_re}/xet-write-token/(?P<rev>[^/]+)", self._no_xet, True),
            ("POST", rf"/api/models/{repo_re}/preupload/(?P<rev>[^/]+)", self._preupload, True),
            ("POST", rf"/api/models/{repo_re}/commit/(?P<rev>[^/]+)", self._commit, True),
            ("GET", rf"/api/models/{repo_re}", self._info, False),
            ("POST", rf"/{repo_re}\.git/info/lfs/objects/batch", self._lfs_batch, True),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_upload, False),
            ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", self._lfs_verify, True),
            ("GET", rf"/{repo_re}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve, False),
            ("HEAD", rf"/{repo_re}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve, False),
        ]
        for verb, pattern, handler, auth in routes:
            m = re.fullmatch(pattern, path)
            if m and verb == method:
                self._auth(env, required=auth)
                with self._lock:
                    return handler(body=body, query=query, env=env, **m.groupdict())
        raise HttpError(404, f"no route for {method} {path}")

    # -- handlers ----------------------------------------------------------------------

    def _harnesses(self, **_: Any) -> tuple[int, list, Any]:
        return 200, [], {"standardEnvVars": [], "harnesses": {}}

    def _whoami(self, **_: Any) -> tuple[int, list, Any]:
        return 200, [], {"type": "user", "name": self.user, "orgs": [], "auth": {}}

    def _validate_yaml(self, body: bytes, **_: Any) -> tuple[int, list, Any]:
        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as exc:
                return 400, [], {"errors": [{"message": f"YAML error: {exc}"}]}
            if meta is not None and not isinstance(meta, dict):
                return 400, [], {"errors": [{"message": "metadata must be a mapping"}]}
            if (
                isinstance(meta, dict)
                and "license" in meta
                and not isinstance(meta["license"], str)
            ):
                return 400, [], {"errors": [{"message": '"license" must be a string'}]}
        return 200, [], {"errors": [], "warnings": []}

    def _create_repo(self, body: bytes, **_: Any) -> tuple[int, list, Any]:
        req = json.loads(body)
        if req.get("type") not in (None, "model"):
            raise HttpError(400, "only model repos are supported by this test server")
        repo_id = f"{req.get('organization') or self.user}/{req['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HttpError(
                409,
                "You already created this model repo",
                body={"error": "You already created this model repo", "url": url},
            )
        repo = Repo(repo_id=repo_id, private=req.get("visibility") == "private")
        first = {
            ".gitattributes": Entry(
                len(GITATTRIBUTES), git_blob_sha1(GITATTRIBUTES), content=GITATTRIBUTES
            )
        }
        self._add_commit(repo, "initial commit", first)
        self.repos[repo_id] = repo
        return 200, [], {"url": url, "name": repo_id, "id": repo_id}

    def _add_commit(self, repo: Repo, summary: str, files: dict[str, Entry]) -> Commit:
        parent = repo.head or None
        listing = "".join(f"{p}\0{e.blob_id}\n" for p, e in sorted(files.items()))
        oid = hashlib.sha1(f"{parent}\n{summary}\n{listing}\n{time.time_ns()}".encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, summary=summary, files=files)
        repo.commits[oid] = commit
        repo.head = oid
        return commit

    def _info(self, repo: str, rev: str = "main", **_: Any) -> tuple[int, list, Any]:
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        card = commit.files.get("README.md")
        card_data = None
        if card is not None and card.content is not None:
            m = re.match(r"^---\n(.*?)\n---\n", card.content.decode(), re.DOTALL)
            card_data = yaml.safe_load(m.group(1)) if m else None
        siblings = []
        for p, e in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": p, "size": e.size, "blobId": e.blob_id}
            if e.lfs_sha256:
                sib["lfs"] = {
                    "size": e.size,
                    "sha256": e.lfs_sha256,
                    "pointerSize": len(lfs_pointer(e.lfs_sha256, e.size)),
                }
            siblings.append(sib)
        return (
            200,
            [],
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "private": r.private,
                "disabled": False,
                "gated": False,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "tags": (card_data or {}).get("tags", []),
                "library_name": (card_data or {}).get("library_name"),
                "pipeline_tag": (card_data or {}).get("pipeline_tag"),
                "cardData": card_data,
                "siblings": siblings,
            },
        )

    def _tree(self, repo: str, rev: str, sub: str | None = None, **_: Any) -> tuple[int, list, Any]:
        commit = self._commit_of(self._repo(repo), rev)
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p, e in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            for i, ch in enumerate(p):
                if ch == "/" and i >= len(prefix):
                    dirs.add(p[:i])
            item: dict[str, Any] = {"type": "file", "path": p, "size": e.size, "oid": e.blob_id}
            if e.lfs_sha256:
                item["lfs"] = {
                    "oid": e.lfs_sha256,
                    "size": e.size,
                    "pointerSize": len(lfs_pointer(e.lfs_sha256, e.size)),
                }
            out.append(item)
        out += [
            {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
            for d in sorted(dirs)
        ]
        return 200, [], out

    def _no_xet(self, **_: Any) -> tuple[int, list, Any]:
        raise HttpError(501, "Xet storage is not implemented by this test server")

    def _preupload(self, repo: str, rev: str, body: bytes, **_: Any) -> tuple[int, list, Any]:
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (
                f["size"] >= LFS_THRESHOLD
                or b"\0" in sample
                or f["path"].lower().endswith(BINARY_SUFFIXES)
            )
            current = commit.files.get(f["path"])
            oid = None
            if current is not None:
                oid = current.lfs_sha256 if current.lfs_sha256 else current.blob_id
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return 200, [], {"files": files, "commitOid": commit.oid}

    def _lfs_batch(self, repo: str, body: bytes, **_: Any) -> tuple[int, list, Any]:
        self._repo(repo)
        req = json.loads(body)
        if req.get("operation") != "upload":
            raise HttpError(400, "only the upload operation is supported")
        objects = []
        for obj in req["objects"]:
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if not self._blob_path(obj["oid"]).exists():
                item["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(item)
        headers = [("Content-Type", "application/vnd.git-lfs+json")]
        return 200, headers, {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, oid: str, body: bytes, **_: Any) -> tuple[int, list, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HttpError(400, "uploaded content does not match its sha256 oid")
        path = self._blob_path(oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)
        return 200, [("ETag", f'"{hashlib.md5(body).hexdigest()}"')], b""

    def _lfs_verify(self, oid: str, body: bytes, **_: Any) -> tuple[int, list, Any]:
        req = json.loads(body)
        path = self._blob_path(oid)
        if not path.exists() or path.stat().st_size != req.get("size"):
            raise HttpError(404, f"LFS object {oid} not found or of another size")
        return 200, [], {"success": True}

    def _commit(
        self, repo: str, rev: str, body: bytes, query: dict[str, str], **_: Any
    ) -> tuple[int, list, Any]:
        r = self._repo(repo)
        if query.get("create_pr"):
            raise HttpError(400, "pull requests are not supported by this test server")
        if rev != "main":
            raise HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != r.head:
            raise HttpError(412, "parentCommit is not the head of the branch")
        files = dict(r.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Entry(len(data), git_blob_sha1(data), content=data)
            elif key == "lfsFile":
                blob = self._blob_path(value["oid"])
                if not blob.exists():
                    raise HttpError(
                        422, f"LFS object {value['oid']} of {value['path']} was not uploaded"
                    )
                size = blob.stat().st_size
                ptr = lfs_pointer(value["oid"], size)
                files[value["path"]] = Entry(size, git_blob_sha1(ptr), lfs_sha256=value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, f"cannot delete {value['path']}: no such file")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"unknown commit operation {key!r}")
        commit = self._add_commit(r, header.get("summary", ""), files)
        return (
            200,
            [],
            {
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": None,
                "success": True,
            },
        )

    def _resolve(self, repo: str, rev: str, file: str, env: dict[str, Any], **_: Any) -> tuple[int, list, Any]:
        r = self._repo(repo)
        commit = self._commit_of(r, rev)
        entry = commit.files.get(file)
        if entry is None:
            raise HttpError(404, f"Entry not found: {file}", code="EntryNotFound")
        headers = [("X-Repo-Commit", commit.oid), ("Content-Type", "application/octet-stream"),
                   ("Accept-Ranges", "bytes")]
        if entry.lfs_sha256:
            headers += [
                ("ETag", f'"{entry.lfs_sha256}"'),
                ("X-Linked-Etag", f'"{entry.lfs_sha256}"'),
                ("X-Linked-Size", str(entry.size)),
            ]
        else:
            headers.append(("ETag", f'"{entry.blob_id}"'))
        # ref: RFC 9110 14.2 Range (one "bytes=a-b" / "bytes=a-" range, as the client sends)
        start, end = 0, entry.size - 1
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", env.get("HTTP_RANGE", ""))
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else entry.size - 1, entry.size - 1)
            if start >= entry.size:
                raise HttpError(416, "Range Not Satisfiable")
            status = 206
            headers.append(("Content-Range", f"bytes {start}-{end}/{entry.size}"))
        source = self._blob_path(entry.lfs_sha256) if entry.lfs_sha256 else (entry.content or b"")
        return status, headers, FileSlice(source, start, end - start + 1, (repo, file))

    # -- test helpers ------------------------------------------------------------------

    def lfs_requests(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if "/info/lfs/" in p or p.startswith("/lfs-")]

    def files(self, repo_id: str) -> dict[str, Entry]:
        return dict(self.repos[repo_id].files)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        pass


@dataclass
class RunningHub:
    hub: FakeHub
    url: str
    token: str


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningHub]:
    """A fresh Hub-compatible server on 127.0.0.1; the client runs with classic LFS."""
    import huggingface_hub.constants

    # hf_xet talks its own CAS protocol, which this server does not speak.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token = "hf_test_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    hub = FakeHub(tmp_path / "hub_storage", token=token)
    server = make_server(
        "127.0.0.1", 0, hub, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    host, port = server.server_address[:2]
    hub.url = f"http://{host}:{port}"
    # Point the client's defaults here as HF_ENDPOINT would before import, so the telemetry
    # probe and any URL built from the defaults stay on this server; its cache in tmp_path.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(
        huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json")
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True
    )
    thread.start()
    try:
        yield RunningHub(hub=hub, url=hub.url, token=token)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
