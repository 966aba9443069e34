"""Artifact store: one small protocol, a local-disk store and an S3 store.

    store = open_store("s3://bucket/releases", endpoint_url="http://127.0.0.1:9000")
    ref = store.put_file("out/model.Q4_0.gguf", "gemma-4-e2b/model.Q4_0.gguf")
    store.get_file(ref.uri, "/tmp/x.gguf", sha256=ref.sha256)

Only `qatgguf.store.s3` imports boto3, and only when an `s3://` store is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from qatgguf.errors import StoreError
from qatgguf.store.base import ArtifactRef, ArtifactStore, ObjectInfo, ProgressCallback, S3Credentials
from qatgguf.store.local import LocalStore

if TYPE_CHECKING:
    from qatgguf.store.s3 import S3Store

__all__ = [
    "ArtifactRef",
    "ArtifactStore",
    "LocalStore",
    "ObjectInfo",
    "ProgressCallback",
    "S3Credentials",
    "S3Store",
    "open_store",
]


def open_store(
    url: str | Path,
    *,
    endpoint_url: str | None = None,
    credentials: S3Credentials | None = None,
    region: str | None = None,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
    max_concurrency: int | None = None,
) -> ArtifactStore:
    """Open the store at `url`: `s3://bucket[/prefix]`, `file:///abs/dir` or a plain path.

    The S3 options are ignored for local stores. Raises StoreError for an unknown scheme.
    """
    text = str(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        from qatgguf.store.s3 import S3Store

        options: dict[str, int] = {}
        if multipart_threshold is not None:
            options["multipart_threshold"] = multipart_threshold
        if multipart_chunksize is not None:
            options["multipart_chunksize"] = multipart_chunksize
        if max_concurrency is not None:
            options["max_concurrency"] = max_concurrency
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=endpoint_url,
            credentials=credentials,
            region=region,
            **options,
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{text}: file URLs must name a local path (file:///abs/path)")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise StoreError(
            f"{text}: unknown store scheme {parsed.scheme!r}; use s3://bucket/prefix, "
            "file:///abs/path or a plain directory path"
        )
    return LocalStore(text)


def __getattr__(name: str) -> object:
    # S3Store lives behind a lazy import so that `import qatgguf.store` never needs boto3.
    if name == "S3Store":
        from qatgguf.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
