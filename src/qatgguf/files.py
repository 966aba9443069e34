"""Writing and hashing whole files: `atomic_output` (a file appears complete or not at
all), `sha256_file` (the digest every content key and store reference uses) and
`copy_hashing` (a copy that yields the same digest on the way)."""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The default temporary beside `path`: `.<name>.tmp<pid>`. The leading dot hides it
    from listings of finished files; the pid lets `qatgguf gc` tell a dead writer's
    leftover from a live one's file (ref: qatgguf/retention.py sweep_scratch)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, tmp: Path | None = None, exclusive: bool = False,
                  mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; when the block ends
    without an error the temporary becomes `path` in one step, so a reader sees the whole
    file or none. On an error the temporary is removed and the error propagates.

    `tmp` names the temporary (default `temp_name(path)`); it must be on the same file
    system as `path`. With `exclusive=True` the first writer wins: the temporary is linked
    to `path` (`os.link`), which raises FileExistsError when `path` already exists, and the
    temporary is removed either way. Otherwise `os.replace` puts it over any old file.
    `mkdir` creates the parent folder first."""
    path = Path(path)
    tmp = temp_name(path) if tmp is None else Path(tmp)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        # after os.replace the name is gone; after os.link (or an error) it is removed here
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 24) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of the file at `path`. Raises OSError when the
    file cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest(), 0
        # hashed from a memory map: no copy of the (multi-GB) file through a buffer
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for o in range(0, size, chunk):
                    h.update(view[o : o + chunk])
            finally:
                view.release()
    return h.hexdigest(), size


def copy_hashing(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, chunk: int = 1 << 23,
                 progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy `src` to the new file `dest` (it must not exist) and flush it to disk; returns
    the (sha256 hex digest, size) of what was written, from the same pass. `progress`
    gets each chunk's byte count. Raises OSError (FileExistsError when `dest` exists)."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while data := fin.read(chunk):
            h.update(data)
            fout.write(data)
            size += len(data)
            if progress is not None:
                progress(len(data))
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size
