"""The artifact store contract shared by the local and S3 stores.

Only small values leave a store: an `ArtifactRef` (URI, sha256, size) is what tasks pass
to each other, never the bytes. Every write is atomic (a reader sees the whole object or
none) and every object carries its sha256 so `stat` needs no download.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from qatgguf.errors import StoreError

# Big enough to keep syscalls cheap on 20 GB GGUFs, small enough to stay off the heap's radar.
CHUNK_SIZE = 8 * 1024 * 1024

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just read for upload (like boto3's `Callback`). The S3
store calls it from boto3's submission thread; an exception it raises aborts the upload."""


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what it holds. JSON-able: `to_dict()` / `from_dict()`."""

    uri: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not _SHA256_RE.match(self.sha256):
            raise StoreError(
                f"{self.uri}: sha256 {self.sha256!r} is not 64 lowercase hex digits; "
                "pass the hexdigest() of hashlib.sha256"
            )
        if self.size < 0:
            raise StoreError(f"{self.uri}: size {self.size} is negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactRef:
        try:
            return cls(uri=str(data["uri"]), sha256=str(data["sha256"]), size=int(data["size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"artifact reference {data!r} is not valid ({exc}); it needs uri, sha256 and size"
            ) from None


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows of an object without reading it: its size, the sha256 recorded
    when it was stored (None for objects written by other tools) and, on S3, its ETag and
    version id (None elsewhere)."""

    key: str
    size: int
    sha256: str | None
    etag: str | None = None
    version_id: str | None = None
    modified: float | None = None  # seconds since the epoch


@dataclass(frozen=True)
class S3Credentials:
    """Explicit S3 credentials. The secret parts never show in `repr` or `str`."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return "S3Credentials(access_key_id='***', secret_access_key='***')"

    __str__ = __repr__

    def secrets(self) -> tuple[str, ...]:
        """The values that must be scrubbed from any message."""
        return tuple(
            s for s in (self.access_key_id, self.secret_access_key, self.session_token) if s
        )


@runtime_checkable
class ArtifactStore(Protocol):
    """One artifact store: keys are relative POSIX paths under the store's root/prefix."""

    def uri_for(self, key: str) -> str:
        """The stable URI of `key` (`file:///...` or `s3://bucket/prefix/key`)."""
        ...

    def put_file(
        self, path: str | Path, key: str, *, progress: ProgressCallback | None = None,
        exclusive: bool = False,
    ) -> ArtifactRef:
        """Upload a file atomically, hashing it while it streams. Raises StoreError.

        With `exclusive` the write only happens if the key does not exist yet (S3
        `If-None-Match: *`; a hard link on disk): two runs that computed the same content
        key cannot clobber each other. When the key exists, the stored object's reference
        is returned (the first writer wins)."""
        ...

    def get_file(self, key_or_uri: str, dest: str | Path, *, sha256: str | None = None) -> Path:
        """Download to `dest` (a file path, or a directory to hold the key's basename).

        The digest is checked against `sha256` when given and against the stored digest;
        `dest` only appears once the bytes are complete and verified. Raises StoreError.
        """
        ...

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> ArtifactRef | None:
        """The reference of an existing object (no download), or None."""
        ...

    def info(self, key: str) -> ObjectInfo | None:
        """Size, recorded sha256, ETag and version of an object, never reading it; None
        when it does not exist."""
        ...

    def read_range(self, key_or_uri: str, start: int, length: int, *, etag: str | None = None) -> bytes:
        """`length` bytes from offset `start` (fewer at the end of the object). With `etag`,
        the read fails unless the object still has that ETag."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object (and its metadata); absent objects are not an error."""
        ...

    def put_bytes(self, data: bytes, key: str, *, exclusive: bool = False) -> ArtifactRef: ...

    def get_bytes(self, key_or_uri: str) -> bytes: ...

    def put_json(self, obj: Any, key: str, *, exclusive: bool = False) -> ArtifactRef: ...

    def get_json(self, key_or_uri: str) -> Any: ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys (sorted) that start with `prefix`."""
        ...

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        """Size and modification time (sha256 where it is free) of every object under
        `prefix`, sorted by key."""
        ...


def validate_key(key: str) -> str:
    """Return the key unchanged or raise StoreError saying which rule it breaks.

    Keys are relative POSIX paths; parts may not start with "." because the stores keep
    their temporary and metadata files under dot-names.
    """
    if not isinstance(key, str):
        raise StoreError(
            f"artifact key must be a str, got {type(key).__name__}; the put_* methods take "
            "the data first, then the key"
        )
    if not key:
        raise StoreError(
            f"artifact key {key!r} is empty; pass a relative path like 'models/x.gguf'"
        )
    if key.startswith("/") or "\\" in key:
        raise StoreError(
            f"artifact key {key!r} must be a relative POSIX path (no leading '/', no '\\')"
        )
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise StoreError(
                f"artifact key {key!r} has an empty part or a part starting with '.' "
                "(reserved for temporary and metadata files); rename it"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A list prefix: like a key but may be empty and may end with '/'."""
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    validate_key(body)
    return prefix


def check_key_arg(key: object, signature: str) -> str:
    """Catch swapped arguments (`put_json(key, obj)`) with a message saying the order."""
    if not isinstance(key, str):
        raise StoreError(
            f"{signature}: key must be a str, got {type(key).__name__}; the data comes first, "
            "then the key"
        )
    return key


def check_sha256(value: str, *, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise StoreError(f"{what}: expected sha256 {value!r} is not 64 lowercase hex digits")
    return value


def dumps_json(obj: Any) -> bytes:
    # Sorted keys make equal objects byte-identical, so their digests match across runs.
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def loads_json(data: bytes, *, uri: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StoreError(f"{uri}: not valid JSON ({exc}); was it written with put_json?") from None


class HashingReader:
    """A read-only, non-seekable stream over a file that hashes what it hands out.

    It knows the size and digest the file had when it was first hashed and raises as soon
    as the bytes differ (too many, too few, other content), before the last byte leaves,
    so an upload that reads through it fails instead of completing with stale metadata.
    Non-seekable on purpose: boto3 then reads every byte exactly once and in order.
    """

    def __init__(
        self,
        f: IO[bytes],
        *,
        uri: str,
        expect_sha256: str,
        expect_size: int,
        progress: ProgressCallback | None = None,
    ) -> None:
        self._f = f
        self._uri = uri
        self._expect_sha256 = expect_sha256
        self._expect_size = expect_size
        self._progress = progress
        self._hash = hashlib.sha256()
        self._done = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else -1)
        if not data:
            if self._done != self._expect_size:
                raise StoreError(
                    f"{self._uri}: source file shrank while uploading ({self._done} of "
                    f"{self._expect_size} bytes); do not modify files while they are stored"
                )
            return data
        self._done += len(data)
        if self._done > self._expect_size:
            raise StoreError(
                f"{self._uri}: source file grew while uploading (more than "
                f"{self._expect_size} bytes); do not modify files while they are stored"
            )
        self._hash.update(data)
        if self._done == self._expect_size and self._hash.hexdigest() != self._expect_sha256:
            raise StoreError(
                f"{self._uri}: source file changed while uploading (sha256 differs from the "
                "first pass); do not modify files while they are stored"
            )
        if self._progress is not None:
            self._progress(len(data))
        return data


class JsonOverBytes:
    """`put_json`/`get_json` for any store that has `put_bytes`/`get_bytes`."""

    def put_json(self, obj: Any, key: str, *, exclusive: bool = False) -> ArtifactRef:
        return self.put_bytes(dumps_json(obj), check_key_arg(key, "put_json(obj, key)"),  # type: ignore[attr-defined]
                              exclusive=exclusive)

    def get_json(self, key_or_uri: str) -> Any:
        return loads_json(self.get_bytes(key_or_uri), uri=key_or_uri)  # type: ignore[attr-defined]
