"""A Hub-compatible test server: the HTTP protocol `huggingface_hub` 2.x speaks for model
repos (create, info, tree, preupload, classic LFS batch/upload/verify, NDJSON commit,
resolve), as a WSGI app run on 127.0.0.1 by the `fake_hub` fixture.

It keeps a commit history per repo in memory and LFS blobs on disk by sha256, checks a
bearer token on writes the way the Hub does (the LFS PUT, validate-yaml and the
telemetry call carry no token), answers 412 to a commit whose `parentCommit` is not the
branch head, holds collections (`/api/collections...`), and logs every request with its
status so tests can assert on traffic.

Faults are injected per request (`FakeHub.inject`): an HTTP status with headers (429 with
Retry-After, 503), a connection dropped after reading part of the body (the client sees
a reset, as when a proxy or the network drops an upload), or a hook run before the
request is handled (a concurrent commit landing between a client's list and its commit).

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

# The license ids the Hub lists for model cards (a subset: the SPDX ones this project can
# meet plus the Hub's own ids); "other" needs license_name and license_link.
HUB_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0",
        "cc-by-sa-4.0", "cc-by-nc-4.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0",
        "unlicense", "openrail", "creativeml-openrail-m", "llama2", "llama3", "llama3.1",
        "gemma", "other",
    }
)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def card_metadata_errors(meta: dict[str, Any]) -> list[str]:
    """What the Hub's validate-yaml refuses in a model card's metadata (the fields this
    project writes): types, license ids, repo ids."""
    errors = []
    if "license" in meta:
        lic = meta["license"]
        if not isinstance(lic, str):
            errors.append('"license" must be a string')
        elif lic not in HUB_LICENSES:
            errors.append(f'"license" {lic!r} is not a license id the Hub knows')
        elif lic == "other" and not (meta.get("license_name") and meta.get("license_link")):
            errors.append('"license: other" needs "license_name" and "license_link"')
    for key in ("license_link", "license_name", "pipeline_tag", "library_name"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "language"):
        value = meta.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            errors.append(f'"{key}" must be a list of strings')
    base = meta.get("base_model")
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        if not all(isinstance(b, str) and _REPO_ID.match(b) for b in bases):
            errors.append('"base_model" must be a repo id or a list of repo ids')
    return errors


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
class Fault:
    """One injected fault: for the next `times` requests matching `method` and the
    `path` regex, answer `status` (with `headers`), or drop the connection (`drop`), or
    run `before(hub)` and then handle the request normally."""

    method: str
    path: str
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    before: Callable[[FakeHub], None] | None = None
    times: int = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.hits < self.times and method == self.method and re.fullmatch(self.path, path) is not None


@dataclass
class Collection:
    slug: str
    title: str
    namespace: str
    private: bool
    description: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    serial: int = 0


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
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    416: "Range Not Satisfiable",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class FakeHub:
    """The WSGI app. `url` is set by the fixture; `requests` logs (method, path) and
    `responses` (method, path, status), status 0 for a dropped connection."""

    def __init__(self, storage_dir: Path, *, token: str | None = None, user: str = "tester"):
        self.storage = Path(storage_dir)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        # bytes of file content sent by resolve, per (repo, file): what a client downloaded
        self.bytes_served: dict[tuple[str, str], int] = {}
        self.responses: list[tuple[str, str, int]] = []
        self.faults: list[Fault] = []
        self.collections: dict[str, Collection] = {}
        self.url = "http://hub.test"
        self._lock = threading.RLock()
        self._serial = 0

    # -- plumbing ----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = unquote(environ.get("PATH_INFO", ""))
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        length = int(environ.get("CONTENT_LENGTH") or 0)
        with self._lock:
            self.requests.append((method, path))
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None:
                fault.hits += 1
        if fault is not None and fault.drop:
            # Read part of the body, then vanish: wsgiref closes the socket without an
            # answer when the app raises ConnectionResetError (BaseHandler.run).
            environ["wsgi.input"].read(length // 2)
            with self._lock:
                self.responses.append((method, path, 0))
            raise ConnectionResetError("fault injected: connection dropped")
        body = environ["wsgi.input"].read(length) if length else b""
        if fault is not None and fault.before is not None:
            fault.before(self)
        try:
            if fault is not None and fault.status is not None:
                raise HttpError(fault.status, f"fault injected: HTTP {fault.status}")
            status, headers, payload = self._route(method, path, query, body, environ)
        except HttpError as err:
            status = err.status
            headers = [("Content-Type", "application/json"), ("X-Error-Message", err.message)]
            if err.code:
                headers.append(("X-Error-Code", err.code))
            if fault is not None and fault.status is not None:
                headers += list(fault.headers)
            payload = json.dumps(
                err.body if err.body is not None else {"error": err.message}
            ).encode()
        with self._lock:
            self.responses.append((method, path, status))
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
        coll_re = r"(?P<slug>[\w.-]+/[\w.-]+-[0-9a-f]{24})"
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
            ("POST", r"/api/collections", self._collection_create, True),
            ("GET", r"/api/collections", self._collection_list, False),
            ("GET", rf"/api/collections/{coll_re}", self._collection_get, False),
            ("POST", rf"/api/collections/{coll_re}/items", self._collection_add, True),
            (
                "PATCH",
                rf"/api/collections/{coll_re}/items/(?P<item>[0-9a-f]+)",
                self._collection_item_update,
                True,
            ),
            (
                "DELETE",
                rf"/api/collections/{coll_re}/items/(?P<item>[0-9a-f]+)",
                self._collection_item_delete,
                True,
            ),
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
        if not m:
            return 200, [], {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as exc:
            return 400, [], {"errors": [{"message": f"YAML error: {exc}"}]}
        if meta is None:
            return 200, [], {"errors": [], "warnings": []}
        if not isinstance(meta, dict):
            return 400, [], {"errors": [{"message": "metadata must be a mapping"}]}
        errors = [{"message": e} for e in card_metadata_errors(meta)]
        return (400 if errors else 200), [], {"errors": errors, "warnings": []}

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

    # -- collections -------------------------------------------------------------------

    def _oid24(self, text: str) -> str:
        self._serial += 1
        return hashlib.sha1(f"{text}\0{self._serial}".encode()).hexdigest()[:24]

    def _collection_json(self, c: Collection) -> dict[str, Any]:
        items = [{**item, "position": i} for i, item in enumerate(c.items)]
        return {
            "slug": c.slug,
            "title": c.title,
            "description": c.description,
            "owner": {"name": c.namespace, "type": "user"},
            "items": items,
            "lastUpdated": "2026-01-01T00:00:00.000Z",
            "position": 0,
            "private": c.private,
            "theme": "blue",
            "upvotes": 0,
        }

    def _collection(self, slug: str) -> Collection:
        c = self.collections.get(slug)
        if c is None:
            raise HttpError(404, f"Collection {slug} not found", code="CollectionNotFound")
        return c

    def _collection_create(self, body: bytes, **_: Any) -> tuple[int, list, Any]:
        req = json.loads(body)
        namespace, title = req["namespace"], req["title"]
        for c in self.collections.values():
            if c.namespace == namespace and c.title == title:
                # ref: HfApi.create_collection(exists_ok=True) reads the slug of a 409
                raise HttpError(409, "Collection already exists", body={"slug": c.slug})
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        slug = f"{namespace}/{base}-{self._oid24(title)}"
        c = Collection(slug, title, namespace, bool(req.get("private")), req.get("description"))
        self.collections[slug] = c
        return 200, [], self._collection_json(c)

    def _collection_list(self, query: dict[str, str], **_: Any) -> tuple[int, list, Any]:
        owner = query.get("owner")
        # The client numbers listed collections itself (Collection(position=...)).
        found = [
            {k: v for k, v in self._collection_json(c).items() if k != "position"}
            for c in self.collections.values()
            if owner is None or c.namespace == owner
        ]
        return 200, [], found

    def _collection_get(self, slug: str, **_: Any) -> tuple[int, list, Any]:
        return 200, [], self._collection_json(self._collection(slug))

    def _collection_add(self, slug: str, body: bytes, **_: Any) -> tuple[int, list, Any]:
        c = self._collection(slug)
        req = json.loads(body)
        item_id, item_type = req["item"]["id"], req["item"]["type"]
        if item_type == "model":
            self._repo(item_id)
        if any(i["id"] == item_id and i["type"] == item_type for i in c.items):
            raise HttpError(409, "Item already in the collection")
        item: dict[str, Any] = {"_id": self._oid24(item_id), "id": item_id, "type": item_type}
        if req.get("note"):
            item["note"] = {"text": req["note"], "html": req["note"]}
        c.items.append(item)
        return 200, [], self._collection_json(c)

    def _item_index(self, c: Collection, item: str) -> int:
        for i, it in enumerate(c.items):
            if it["_id"] == item:
                return i
        raise HttpError(404, f"Item {item} not in {c.slug}")

    def _collection_item_update(
        self, slug: str, item: str, body: bytes, **_: Any
    ) -> tuple[int, list, Any]:
        c = self._collection(slug)
        i = self._item_index(c, item)
        req = json.loads(body)
        entry = c.items[i]
        if "note" in req:
            entry["note"] = {"text": req["note"], "html": req["note"]}
        if "position" in req:
            # The item moves to the new index; the others keep their order.
            c.items.pop(i)
            c.items.insert(max(0, min(int(req["position"]), len(c.items))), entry)
        return 200, [], {"success": True}

    def _collection_item_delete(self, slug: str, item: str, **_: Any) -> tuple[int, list, Any]:
        c = self._collection(slug)
        c.items.pop(self._item_index(c, item))
        return 200, [], {"success": True}

    # -- test helpers ------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Arm a fault (see `Fault`); returns it so a test can read `hits`."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def commit_by_hand(self, repo_id: str, files: dict[str, bytes], *, summary: str = "by hand") -> str:
        """A commit made by someone else (regular files): what a person or another job
        pushes between a publisher's list and its commit. Returns the new head."""
        with self._lock:
            r = self._repo(repo_id)
            entries = dict(r.files)
            for path, data in files.items():
                entries[path] = Entry(len(data), git_blob_sha1(data), content=data)
            return self._add_commit(r, summary, entries).oid

    def commits(self, repo_id: str) -> list[Commit]:
        """The branch history, oldest first."""
        r = self.repos[repo_id]
        out, oid = [], r.head
        while oid:
            out.append(r.commits[oid])
            oid = r.commits[oid].parent or ""
        return out[::-1]

    def lfs_puts(self) -> list[str]:
        """The oids of LFS uploads that arrived in full (status 200)."""
        return [p.rsplit("/", 1)[-1] for m, p, st in self.responses if m == "PUT" and st == 200]

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
