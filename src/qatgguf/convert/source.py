"""Where a checkpoint comes from, pinned to exact bytes.

A source is a local directory, `hf://org/repo[@revision]` (a Hub model repo) or
`s3://bucket/prefix`. `snapshot()` resolves it to a `SourceRef`: the immutable revision
(the Hub commit sha, even for `@main`; on S3 a digest over every object's ETag and version
id; locally a digest over the files' sha256) and, per file, its name, size and content
digest, without downloading any weights. A `SourceRef` is small plain data: it goes into
the conversion plan and crosses task boundaries, and every task opens its own
`SourceReader` on it to read header ranges or fetch exactly the files it needs, each
checked against the digest the plan recorded.

Digests are `sha256:<hex>` (Hub LFS files, objects this project stored on S3, local files),
`git-sha1:<hex>` (small Hub files kept in git, checked as git blob ids) or `etag:<etag>`
(S3 objects written by other tools: the download is pinned to that ETag, and a single-part
ETag, the MD5 of the body, is checked).

Credentials never enter a `SourceRef`: readers take them from `SourceOptions` or, by
default, from the environment of the machine they run on (HF_TOKEN, the AWS chain).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qatgguf.errors import CheckpointError
from qatgguf.files import atomic_output, sha256_file
from qatgguf.paths import cache_root

# Small files the converter reads in full (config, tokenizer, template, processor).
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json", "added_tokens.json", "README.md",
               "processor_config.json", "preprocessor_config.json")
WEIGHTS = "*.safetensors"  # pickles (*.bin, *.pt) are never fetched
# Headers of real shards are 10-300 KB: one ranged read of this size usually holds all.
HEADER_PROBE = 256 * 1024
_HF_RE = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def is_checkpoint_file(name: str) -> bool:
    return "/" not in name and (name in SMALL_FILES or fnmatch.fnmatch(name, WEIGHTS))


@dataclass(frozen=True)
class SourceOptions:
    """How to reach sources. Anything left None comes from the machine's environment
    (HF_ENDPOINT, HF_TOKEN, the AWS credential chain), so nothing secret has to travel
    with a task."""

    hf_endpoint: str | None = None
    hf_token: str | None = field(default=None, repr=False)
    s3_endpoint: str | None = None
    s3_credentials: Any = field(default=None, repr=False)  # qatgguf.store.S3Credentials
    s3_region: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SourceOptions:
        """The keyword names the converter has always taken: hf_endpoint, hf_token,
        endpoint_url, credentials, region (cache_dir is accepted and unused)."""
        d = dict(d or {})
        d.pop("cache_dir", None)
        known = {"hf_endpoint", "hf_token", "endpoint_url", "credentials", "region"}
        extra = set(d) - known
        if extra:
            raise TypeError(f"unknown source options {sorted(extra)}; known: {sorted(known)}")
        return cls(hf_endpoint=d.get("hf_endpoint"), hf_token=d.get("hf_token"), s3_endpoint=d.get("endpoint_url"),
                   s3_credentials=d.get("credentials"), s3_region=d.get("region"))

    def secrets(self) -> list[str]:
        out = [self.hf_token] if self.hf_token else []
        if self.s3_credentials is not None:
            out += list(self.s3_credentials.secrets())
        return out


@dataclass(frozen=True)
class SourceFile:
    name: str
    size: int
    digest: str  # "sha256:<hex>", "git-sha1:<hex>", "etag:<etag>" or "" (local, not hashed)
    version: str | None = None  # S3 version id, when the bucket keeps versions

    @property
    def sha256(self) -> str | None:
        return self.digest[7:] if self.digest.startswith("sha256:") else None


@dataclass(frozen=True)
class SourceRef:
    """One checkpoint at one immutable revision: what the plan records and tasks fetch."""

    uri: str  # hf://org/repo, s3://bucket/prefix or file:///abs/dir (no revision)
    revision: str
    name: str  # the checkpoint folder's name (llama.cpp's converter names the model after it)
    files: tuple[SourceFile, ...]

    def file(self, name: str) -> SourceFile:
        for f in self.files:
            if f.name == name:
                return f
        raise CheckpointError(f"{name!r} is not in this checkpoint at revision {self.revision[:12]}; "
                              f"it holds {', '.join(f.name for f in self.files) or 'nothing'}", file=self.label(name))

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.files)

    def shard_names(self) -> list[str]:
        return sorted(f.name for f in self.files if fnmatch.fnmatch(f.name, WEIGHTS))

    def label(self, name: str | None = None) -> str:
        """How errors name a file of this source."""
        base = self.uri if self.uri.startswith(("hf://", "s3://")) else self.uri.removeprefix("file://")
        return f"{base}/{name}" if name else base

    @property
    def local_dir(self) -> Path | None:
        return Path(self.uri.removeprefix("file://")) if self.uri.startswith("file://") else None

    def digest(self) -> str:
        """sha256 over the URI, revision and every file's digest: the snapshot's identity."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceRef:
        return cls(uri=d["uri"], revision=d["revision"], name=d["name"],
                   files=tuple(SourceFile(**f) for f in d["files"]))


# ------------------------------------------------------------------------------ snapshot


def parse_hf_url(url: str) -> tuple[str, str | None]:
    """`hf://org/repo@rev` -> ("org/repo", "rev"); the revision is optional."""
    m = _HF_RE.match(url)
    if not m:
        raise CheckpointError(f"{url!r} is not hf://org/repo[@revision]", file=url)
    return m.group("repo"), m.group("rev")


def snapshot(src: str | Path | SourceRef, *, options: SourceOptions | None = None,
             hash_local: bool = True) -> SourceRef:
    """Resolve a source to its immutable revision and list its checkpoint files with their
    sizes and digests, downloading no weights. `hash_local=False` leaves local files
    unhashed (a one-process conversion that records no content keys). Raises
    `CheckpointError` naming the source."""
    if isinstance(src, SourceRef):
        return src
    text = str(src)
    opts = options or SourceOptions()
    if text.startswith("hf://"):
        return _snapshot_hf(text, opts)
    if text.startswith("s3://"):
        return _snapshot_s3(text, opts)
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise CheckpointError("checkpoint directory does not exist", file=text)
    return _snapshot_local(path.resolve(), hash_local=hash_local)


def _hf_api(opts: SourceOptions):
    from huggingface_hub import HfApi

    return HfApi(endpoint=opts.hf_endpoint, token=opts.hf_token)


def _hf_error(exc: Exception, url: str, opts: SourceOptions) -> CheckpointError:
    msg = str(exc)
    for s in opts.secrets() + [os.environ.get("HF_TOKEN") or ""]:
        if s and len(s) >= 4:
            msg = msg.replace(s, "***")
    return CheckpointError(f"cannot read from the Hub: {type(exc).__name__}: {msg}", file=url)


def _snapshot_hf(url: str, opts: SourceOptions) -> SourceRef:
    repo, rev = parse_hf_url(url)
    api = _hf_api(opts)
    try:
        sha = api.repo_info(repo, revision=rev or "main").sha
        entries = list(api.list_repo_tree(repo, revision=sha, recursive=False))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds
        raise _hf_error(exc, url, opts) from None
    files = []
    for e in entries:
        if getattr(e, "size", None) is None or not is_checkpoint_file(e.path):
            continue  # folders, pickles, other files
        lfs = getattr(e, "lfs", None)
        sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        files.append(SourceFile(e.path, int(e.size), f"sha256:{sha256}" if sha256 else f"git-sha1:{e.blob_id}"))
    return SourceRef(uri=f"hf://{repo}", revision=sha, name=repo.split("/")[1], files=tuple(sorted(
        files, key=lambda f: f.name)))


def _s3_store(uri: str, opts: SourceOptions):
    from qatgguf.store import open_store

    return open_store(uri, endpoint_url=opts.s3_endpoint, credentials=opts.s3_credentials, region=opts.s3_region)


def _snapshot_s3(url: str, opts: SourceOptions) -> SourceRef:
    store = _s3_store(url, opts)
    files = []
    for key in store.list(""):
        if not is_checkpoint_file(key):
            continue
        info = store.info(key)
        if info is None:
            continue  # deleted between list and head
        digest = f"sha256:{info.sha256}" if info.sha256 else f"etag:{info.etag}"
        files.append(SourceFile(key, info.size, digest, info.version_id))
    if not files:
        raise CheckpointError("no checkpoint files (config.json, *.safetensors) under this prefix", file=url)
    listing = json.dumps([(f.name, f.size, f.digest, f.version) for f in files]).encode()
    leaf = url.rstrip("/").rsplit("/", 1)[-1]
    return SourceRef(uri=url.rstrip("/"), revision="s3:" + hashlib.sha256(listing).hexdigest(), name=leaf,
                     files=tuple(files))


def local_sha256(path: Path) -> str:
    """sha256 of a local file, remembered per (device, inode, size, mtime) in the cache so
    an unchanged multi-GB shard is hashed once."""
    st = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}".encode())
    memo = cache_root() / "digests" / ident.hexdigest()
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest, _size = sha256_file(path)
    try:
        with atomic_output(memo) as tmp:
            tmp.write_text(digest)
    except OSError:
        pass
    return digest


def _snapshot_local(path: Path, *, hash_local: bool) -> SourceRef:
    files = []
    for p in sorted(path.iterdir()):
        if p.is_file() and is_checkpoint_file(p.name):
            digest = f"sha256:{local_sha256(p)}" if hash_local else ""
            files.append(SourceFile(p.name, p.stat().st_size, digest))
    listing = json.dumps([(f.name, f.size, f.digest) for f in files]).encode()
    return SourceRef(uri=f"file://{path}", revision="local:" + hashlib.sha256(listing).hexdigest(), name=path.name,
                     files=tuple(files))


# ------------------------------------------------------------------------------ readers


class SourceReader:
    """Reads one snapshot: byte ranges (headers) and whole files, each checked against the
    snapshot. `bytes_read` counts what crossed the network (or the disk, locally)."""

    def __init__(self, ref: SourceRef, options: SourceOptions | None = None) -> None:
        self.ref = ref
        self.options = options or SourceOptions()
        self.bytes_read = 0
        self.headers: dict[str, Any] = {}  # shard name -> ShardHeader, read once

    def read_range(self, name: str, start: int, length: int) -> bytes:
        raise NotImplementedError

    def _download(self, f: SourceFile, dest: Path) -> None:
        raise NotImplementedError

    def local_path(self, name: str) -> Path | None:
        """The file itself when the source is a local directory (read in place), else None."""
        return None

    def fetch(self, name: str, dest_dir: Path) -> Path:
        """`name` as a local file, its size and digest checked against the snapshot; a
        local source's file is checked in place, others are downloaded into `dest_dir`.
        Raises `CheckpointError` when the bytes are not the ones the plan saw."""
        f = self.ref.file(name)
        here = self.local_path(name)
        if here is not None:
            _verify(here, f, self.ref)
            return here
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / name
        with atomic_output(dest, tmp=dest_dir / f".{name}.part{os.getpid()}", mkdir=False) as tmp:
            self._download(f, tmp)
            self.bytes_read += tmp.stat().st_size
            _verify(tmp, f, self.ref)
        return dest

    @contextmanager
    def small_files(self, names: Iterable[str] = SMALL_FILES) -> Iterator[Path]:
        """A folder named like the checkpoint holding its small files (config, tokenizer,
        template...): the source folder itself when local, else a temporary download."""
        here = self.ref.local_dir
        if here is not None:
            yield here
            return
        with tempfile.TemporaryDirectory(prefix="qatgguf-meta-", dir=_scratch_root()) as tmp:
            d = Path(tmp) / self.ref.name
            d.mkdir()
            for n in names:
                if self.ref.has(n):
                    self.fetch(n, d)
            yield d


def _scratch_root() -> Path:
    root = cache_root() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _git_blob_sha1(path: Path) -> str:
    # ref: git hash-object: sha1("blob <size>\0" + content)
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, f: SourceFile, ref: SourceRef) -> None:
    size = path.stat().st_size
    if size != f.size:
        raise CheckpointError(
            f"file is {size} bytes, the plan saw {f.size} at revision {ref.revision[:12]}; the source "
            "changed after planning: plan again", file=ref.label(f.name))
    kind, _, want = f.digest.partition(":")
    if kind == "sha256":
        got = local_sha256(path) if ref.local_dir is not None else sha256_file(path)[0]
    elif kind == "git-sha1":
        got = _git_blob_sha1(path)
    else:  # etag (checked by the S3 read itself) or not hashed (local, one process)
        return
    if got != want:
        raise CheckpointError(
            f"{kind} {got[:16]}… differs from the plan's {want[:16]}… (revision {ref.revision[:12]}); "
            "the file is corrupt or was replaced: it is not converted; plan again", file=ref.label(f.name))


class LocalReader(SourceReader):
    def local_path(self, name: str) -> Path | None:
        d = self.ref.local_dir
        assert d is not None
        return d / name

    def read_range(self, name: str, start: int, length: int) -> bytes:
        path = self.local_path(name)
        try:
            with open(path, "rb") as fh:  # type: ignore[arg-type]
                fh.seek(start)
                data = fh.read(length)
        except FileNotFoundError:
            raise CheckpointError("shard file does not exist", file=str(path)) from None
        self.bytes_read += len(data)
        return data


class HubReader(SourceReader):
    def __init__(self, ref: SourceRef, options: SourceOptions | None = None) -> None:
        super().__init__(ref, options)
        self.repo = ref.uri.removeprefix("hf://")

    def _url(self, name: str) -> str:
        from huggingface_hub import constants
        from huggingface_hub.file_download import hf_hub_url

        return hf_hub_url(self.repo, name, revision=self.ref.revision,
                          endpoint=self.options.hf_endpoint or constants.ENDPOINT)

    def read_range(self, name: str, start: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = {**build_hf_headers(token=self.options.hf_token), "range": f"bytes={start}-{start + length - 1}"}
        try:
            r = get_session().get(self._url(name), headers=headers, follow_redirects=True)
            hf_raise_for_status(r)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub / httpx raise many kinds
            raise _hf_error(exc, self.ref.label(name), self.options) from None
        data = r.content[:length] if r.status_code == 206 else r.content[start:start + length]
        self.bytes_read += len(r.content)
        return data

    def _download(self, f: SourceFile, dest: Path) -> None:
        from huggingface_hub import hf_hub_download

        with tempfile.TemporaryDirectory(prefix="hf-", dir=dest.parent) as tmp:
            try:
                got = hf_hub_download(self.repo, f.name, revision=self.ref.revision, local_dir=tmp,
                                      endpoint=self.options.hf_endpoint, token=self.options.hf_token)
            except Exception as exc:  # noqa: BLE001
                raise _hf_error(exc, self.ref.label(f.name), self.options) from None
            os.replace(got, dest)


class S3Reader(SourceReader):
    def __init__(self, ref: SourceRef, options: SourceOptions | None = None) -> None:
        super().__init__(ref, options)
        self.store = _s3_store(ref.uri, self.options)

    def read_range(self, name: str, start: int, length: int) -> bytes:
        from qatgguf.errors import StoreError

        f = self.ref.file(name)
        etag = f.digest[5:] if f.digest.startswith("etag:") else None
        try:
            data = self.store.read_range(name, start, length, etag=etag)
        except StoreError as exc:
            raise CheckpointError(str(exc), file=self.ref.label(name)) from None
        self.bytes_read += len(data)
        return data

    def _download(self, f: SourceFile, dest: Path) -> None:
        from qatgguf.errors import StoreError

        try:
            self.store.get_file(f.name, dest, sha256=f.sha256,
                                etag=f.digest[5:] if f.digest.startswith("etag:") else None)
        except StoreError as exc:
            raise CheckpointError(str(exc), file=self.ref.label(f.name)) from None


def open_reader(ref: SourceRef, options: SourceOptions | None = None) -> SourceReader:
    if ref.uri.startswith("hf://"):
        return HubReader(ref, options)
    if ref.uri.startswith("s3://"):
        return S3Reader(ref, options)
    return LocalReader(ref, options)


def read_shard_header(reader: SourceReader, name: str):
    """The checked header of shard `name`, read with one or two ranged reads (no tensor
    data). Raises `CheckpointError` naming the shard."""
    from qatgguf.convert.safetensors import header_length, parse_header

    if name in reader.headers:
        return reader.headers[name]
    f = reader.ref.file(name)
    label = reader.ref.label(name)
    head = reader.read_range(name, 0, min(f.size, HEADER_PROBE)) if f.size else b""
    n = header_length(head[:8], file_size=f.size, file=label)
    raw = head[8:8 + n]
    if len(raw) < n:
        raw += reader.read_range(name, 8 + len(raw), n - len(raw))
    if len(raw) != n:
        raise CheckpointError(f"read {len(raw)} of the {n} header bytes; the shard is truncated", file=label)
    reader.headers[name] = parse_header(raw, file_size=f.size, file=label)
    return reader.headers[name]


def fetch_checkpoint(ref: SourceRef, dest: Path, *, options: SourceOptions | None = None,
                     names: Iterable[str] | None = None) -> Path:
    """Every checkpoint file (or `names`) of a snapshot in a local folder named like the
    checkpoint; the source folder itself for a local source."""
    if ref.local_dir is not None:
        return ref.local_dir
    reader = open_reader(ref, options)
    out = Path(dest) / ref.name
    for n in (names if names is not None else [f.name for f in ref.files]):
        if not (out / n).is_file() or (out / n).stat().st_size != ref.file(n).size:
            reader.fetch(n, out)
    return out


def remove_fetched(path: Path, ref: SourceRef) -> None:
    """Delete a fetched file, never a file of a local source."""
    if ref.local_dir is None or Path(path).parent.resolve() != ref.local_dir.resolve():
        Path(path).unlink(missing_ok=True)
