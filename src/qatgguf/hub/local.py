"""Publish into a local folder laid out exactly as the Hub repo: `root/<org>/<name>/`
holds the files at their repo paths and README.md, nothing else.

A publish builds the complete new folder under a dot-name next to the target, then swaps
it in with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two
renames), and only then removes the previous folder. Readers see the old set or the new
set, never a mix, and a failed publish leaves the previous one untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from qatgguf.errors import PublishError
from qatgguf.hub.base import CARD_PATH, HubLimits, PublishResult, plan_files, split_repo_id
from qatgguf.hub.card import check_card

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # ref: linux include/uapi/linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories. False where the OS cannot (caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _copy_hashing(src: Path, dest: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


class LocalHubPublisher:
    """`Publisher` into `root/<org>/<name>/`. Idempotent: the same inputs give the same
    folder and the same commit id (a digest of the paths and contents)."""

    def __init__(self, root: str | Path, *, limits: HubLimits | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.limits = limits or HubLimits()

    def __repr__(self) -> str:
        return f"LocalHubPublisher({str(self.root)!r})"

    def repo_dir(self, repo_id: str) -> Path:
        org, name = split_repo_id(repo_id)
        return self.root / org / name

    @contextlib.contextmanager
    def _lock(self, target: Path) -> Iterator[None]:
        # Two publishes of one repo must not interleave their swaps.
        lock_path = target.with_name(f".{target.name}.lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def publish(
        self,
        repo_id: str,
        files: Sequence[Path],
        card_text: str,
        *,
        commit_message: str,
    ) -> PublishResult:
        plan = plan_files(repo_id, files, limits=self.limits)
        check_card(card_text)
        target = self.repo_dir(repo_id)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._lock(target):
                self._clean_leftovers(target)
                commit, names = self._stage_and_swap(target, plan, card_text)
        except OSError as exc:
            raise PublishError(
                f"{target}: publishing {repo_id} failed: {exc.strerror or exc}; the previous "
                "publish (if any) is unchanged"
            ) from exc
        log.info("published %s to %s (%s): %s", repo_id, target, commit[:12], commit_message)
        return PublishResult(repo_id=repo_id, url=target.as_uri(), commit=commit, files=names)

    def _clean_leftovers(self, target: Path) -> None:
        # A crash can leave a stage or old folder behind; they are never the live one.
        for pattern in (f".{target.name}.stage-*", f".{target.name}.old-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)

    def _stage_and_swap(
        self, target: Path, plan: dict[str, Path], card_text: str
    ) -> tuple[str, tuple[str, ...]]:
        stage = target.with_name(f".{target.name}.stage-{uuid.uuid4().hex}")
        stage.mkdir()
        try:
            digests: dict[str, str] = {}
            for name, src in plan.items():
                digests[name] = _copy_hashing(src, stage / name)
            card = card_text.encode()
            (stage / CARD_PATH).write_bytes(card)
            digests[CARD_PATH] = hashlib.sha256(card).hexdigest()
            names = tuple(sorted(digests))
            manifest = "".join(f"{n}\0{digests[n]}\n" for n in names)
            commit = hashlib.sha1(manifest.encode()).hexdigest()
            if target.exists():
                if _exchange(stage, target):
                    old = stage  # after the exchange the stage name holds the old folder
                else:
                    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
                    os.rename(target, old)
                    try:
                        os.rename(stage, target)
                    except BaseException:
                        os.rename(old, target)
                        raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return commit, names
