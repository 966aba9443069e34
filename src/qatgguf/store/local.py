"""Artifact store on a local (or shared network) file system.

Layout: the object of key `a/b.gguf` is `root/a/b.gguf`, exactly as the key says, so the
tree is usable without the store. Its digest sits in a sidecar `root/.qatgguf-meta/a/b.gguf.json`
together with the size and mtime it was computed for; a sidecar that no longer matches
the file is ignored and the digest recomputed. Temporary files are dot-names next to the
target and are renamed into place only when complete (POSIX rename is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from qatgguf.errors import StoreError
from qatgguf.files import atomic_output, copy_hashing, sha256_file
from qatgguf.store.base import (
    CHUNK_SIZE,
    ArtifactRef,
    JsonOverBytes,
    ObjectInfo,
    ProgressCallback,
    check_sha256,
    validate_key,
    validate_prefix,
)

META_DIR = ".qatgguf-meta"


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_hashing(
    src: Path, dest: Path, *, progress: ProgressCallback | None = None, exclusive: bool = False
) -> tuple[str | None, int]:
    """Copy `src` to a temporary name next to `dest`, hash while copying, then rename.

    Returns (sha256, size); (None, 0) when `exclusive` and `dest` already existed.
    Nothing is left at `dest` or the temporary name on failure.
    """
    try:
        # exclusive: a hard link, which fails when `dest` exists (the first writer wins)
        with atomic_output(dest, tmp=_tmp_name(dest), exclusive=exclusive) as tmp:
            digest, size = copy_hashing(src, tmp, chunk=CHUNK_SIZE, progress=progress)
    except FileExistsError:
        if not exclusive:
            raise
        return None, 0
    _fsync_dir(dest.parent)
    return digest, size


class LocalStore(JsonOverBytes):
    """`ArtifactStore` over a directory. Create with `open_store("file:///abs/dir")`."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_absolute():
            root = root.resolve()
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root}: store root exists but is not a directory; pick another path")
        self.root = root

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- keys and URIs ---------------------------------------------------------------

    def uri_for(self, key: str) -> str:
        validate_key(key)
        return "file://" + quote(str(self.root / key))

    def _key_of(self, key_or_uri: str) -> str:
        if not key_or_uri.startswith("file://"):
            if "://" in key_or_uri:
                raise StoreError(
                    f"{key_or_uri}: not a URI of this store ({self.uri_for_root()}); "
                    "open the store the URI belongs to"
                )
            return validate_key(key_or_uri)
        parsed = urlparse(key_or_uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{key_or_uri}: file URIs must name a local path (file:///abs/path)")
        path = Path(unquote(parsed.path))
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            raise StoreError(
                f"{key_or_uri}: outside this store's root {self.root}; open the store "
                "the URI belongs to"
            ) from None
        return validate_key(rel.as_posix())

    def uri_for_root(self) -> str:
        return "file://" + quote(str(self.root))

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / META_DIR / f"{key}.json"

    # -- metadata sidecars -------------------------------------------------------------

    def _write_meta(self, key: str, sha256: str, size: int) -> None:
        st = (self.root / key).stat()
        meta = self._meta_path(key)
        payload = {"sha256": sha256, "size": size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        with atomic_output(meta, tmp=_tmp_name(meta)) as tmp:
            tmp.write_text(json.dumps(payload))

    def _read_meta(self, key: str, st: os.stat_result) -> str | None:
        """The stored digest if the sidecar still describes this exact file."""
        try:
            meta = json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            return None
        if (
            meta.get("size") == st.st_size
            and meta.get("mtime_ns") == st.st_mtime_ns
            and meta.get("ino") == st.st_ino
        ):
            return meta.get("sha256")
        return None

    # -- protocol ----------------------------------------------------------------------

    def put_file(
        self, path: str | Path, key: str, *, progress: ProgressCallback | None = None,
        exclusive: bool = False,
    ) -> ArtifactRef:
        src = Path(path)
        dest = self._path(key)
        uri = self.uri_for(key)
        if not src.is_file():
            raise StoreError(f"{src}: cannot store as {uri}: not a regular file")
        try:
            if dest.exists() and (exclusive or os.path.samefile(src, dest)):
                ref = self.stat(key)
                if ref is not None:
                    return ref
            sha256, size = _copy_hashing(src, dest, progress=progress, exclusive=exclusive)
            if exclusive and sha256 is None:  # another writer got there first
                ref = self.stat(key)
                assert ref is not None
                return ref
            self._write_meta(key, sha256, size)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"{src}: storing as {uri} failed: {exc.strerror or exc}") from exc
        return ArtifactRef(uri=uri, sha256=sha256, size=size)

    def get_file(
        self, key_or_uri: str, dest: str | Path, *, sha256: str | None = None, etag: str | None = None
    ) -> Path:
        # `etag` is an S3 notion; a local object has none, so it is not checked here
        key = self._key_of(key_or_uri)
        uri = self.uri_for(key)
        if sha256 is not None:
            check_sha256(sha256, what=uri)
        src = self.root / key
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / src.name
        try:
            st = src.stat()
        except FileNotFoundError:
            raise StoreError(
                f"{uri}: no such artifact (get_file); check the key or run the step that stores it"
            ) from None
        stored = self._read_meta(key, st)
        try:
            with atomic_output(dest, tmp=_tmp_name(dest)) as tmp:
                got, _ = copy_hashing(src, tmp, chunk=CHUNK_SIZE)
                for want, source in ((sha256, "expected"), (stored, "stored")):
                    if want is not None and got != want:
                        raise StoreError(
                            f"{uri}: sha256 mismatch: {source} {want}, read {got}; the object is "
                            "corrupt or not the one referenced; re-run the step that stores it"
                        )
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"{uri}: get_file to {dest} failed: {exc.strerror or exc}") from exc
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ArtifactRef | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        sha256 = self._read_meta(key, st)
        if sha256 is None:
            sha256, size = sha256_file(path)
            with contextlib.suppress(OSError):
                self._write_meta(key, sha256, size)
        return ArtifactRef(uri=self.uri_for(key), sha256=sha256, size=st.st_size)

    def put_bytes(self, data: bytes, key: str, *, exclusive: bool = False) -> ArtifactRef:
        dest = self._path(key)
        uri = self.uri_for(key)
        try:
            try:
                with atomic_output(dest, tmp=_tmp_name(dest), exclusive=exclusive) as tmp:
                    with open(tmp, "xb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
            except FileExistsError:
                if not exclusive:
                    raise
                # another writer was first: its object stands
                ref = self.stat(key)
                assert ref is not None
                return ref
            sha256 = hashlib.sha256(data).hexdigest()
            self._write_meta(key, sha256, len(data))
        except OSError as exc:
            raise StoreError(f"{uri}: put_bytes failed: {exc.strerror or exc}") from exc
        return ArtifactRef(uri=uri, sha256=sha256, size=len(data))

    def get_bytes(self, key_or_uri: str) -> bytes:
        key = self._key_of(key_or_uri)
        uri = self.uri_for(key)
        path = self.root / key
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"{uri}: no such artifact (get_bytes); check the key or run the step that stores it"
            ) from None
        except OSError as exc:
            raise StoreError(f"{uri}: get_bytes failed: {exc.strerror or exc}") from exc
        stored = self._read_meta(key, st)
        got = hashlib.sha256(data).hexdigest()
        if stored is not None and stored != got:
            raise StoreError(
                f"{uri}: sha256 mismatch: stored {stored}, read {got}; object is corrupt"
            )
        return data

    def info(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, sha256=self._read_meta(key, st), modified=st.st_mtime)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        for key in self.list(prefix):
            try:
                st = (self.root / key).stat()
            except FileNotFoundError:
                continue
            out.append(ObjectInfo(key=key, size=st.st_size, sha256=None, modified=st.st_mtime))
        return out

    def temporary_files(self) -> list[Path]:
        """Temporary files of writes that never finished (a killed process leaves them)."""
        return [p for p in self.root.rglob(".*.tmp-*") if p.is_file()] if self.root.is_dir() else []

    def read_range(self, key_or_uri: str, start: int, length: int, *, etag: str | None = None) -> bytes:
        key = self._key_of(key_or_uri)
        if start < 0 or length < 1:
            raise StoreError(f"{self.uri_for(key)}: read_range({start}, {length}) needs start >= 0 and length >= 1")
        try:
            with open(self.root / key, "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise StoreError(f"{self.uri_for(key)}: no such artifact (read_range)") from None
        except OSError as exc:
            raise StoreError(f"{self.uri_for(key)}: read_range failed: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta_path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, not the whole store.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / head if head else self.root
        keys: list[str] = []
        if not start.is_dir():
            return keys
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)
