"""Publish into a local folder laid out exactly as the Hub repo: `root/<org>/<name>/`
holds the files at their repo paths, README.md and the manifest, plus whatever someone put
there by hand (kept, as on the Hub). Collections are JSON files under
`root/.collections/<namespace>/`.

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
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from qatgguf.errors import PublishError
from qatgguf.files import atomic_output, copy_hashing, sha256_file
from qatgguf.hub.base import (
    RESERVED_PATHS,
    CollectionRef,
    HubLimits,
    PublishResult,
    plan_files,
    split_repo_id,
)
from qatgguf.hub.card import check_card
from qatgguf.hub.manifest import (
    MANIFEST_PATH,
    Manifest,
    ReleaseUpload,
    RemoteFile,
    check_release_paths,
    plan_repo,
)

log = logging.getLogger(__name__)

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


def _listing_commit(files: dict[str, str]) -> str:
    """The folder's "commit": a digest of its paths and contents, so an unchanged folder
    keeps its id."""
    text = "".join(f"{p}\0{files[p]}\n" for p in sorted(files))
    return hashlib.sha1(text.encode()).hexdigest()


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"


class LocalHubPublisher:
    """`Publisher` into `root/<org>/<name>/`. Idempotent: publishing the same release
    again changes nothing and returns the same commit id (a digest of paths and
    contents)."""

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
        self, repo_id: str, upload: ReleaseUpload, *, commit_message: str
    ) -> PublishResult:
        """Raises PublishError (limits, names, disk) or ModelCardError (the card)."""
        plan = plan_files(repo_id, upload.files, limits=self.limits)
        check_release_paths(upload, RESERVED_PATHS)
        target = self.repo_dir(repo_id)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._lock(target):
                self._clean_leftovers(target)
                current = self._current(target)
                previous = None
                if MANIFEST_PATH in current:
                    previous = Manifest.from_json(
                        (target / MANIFEST_PATH).read_bytes(), where=str(target)
                    )
                digests = {name: (sha256_file(f.path)[0], f.path.stat().st_size) for name, f in plan.items()}
                repo_plan, generated = plan_repo(
                    repo_id, upload, digests=digests, remote=current, previous=previous
                )
                check_card(repo_plan.card_text)
                before = {p: r.sha256 or "" for p, r in current.items()}
                if not repo_plan.changed:
                    log.info("%s: %s already holds this release; nothing to do", repo_id, target)
                    return self._result(repo_id, target, _listing_commit(before), repo_plan,
                                        committed=False)
                after = self._stage_and_swap(target, current, repo_plan, plan, generated)
        except OSError as exc:
            raise PublishError(
                f"{target}: publishing {repo_id} failed: {exc.strerror or exc}; the previous "
                "publish (if any) is unchanged"
            ) from exc
        commit = _listing_commit(after)
        log.info("published %s to %s (%s): %s", repo_id, target, commit[:12], commit_message)
        return self._result(repo_id, target, commit, repo_plan, committed=True)

    def _result(self, repo_id: str, target: Path, commit: str, plan, *, committed: bool) -> PublishResult:
        files = tuple(sorted(p for p in self._current(target) if p != MANIFEST_PATH))
        return PublishResult(
            repo_id=repo_id,
            url=target.as_uri(),
            commit=commit,
            files=files,
            committed=committed,
            written=plan.writes if committed else (),
            deleted=plan.deletes if committed else (),
            kept=tuple(e.path for e in plan.kept),
        )

    def _current(self, target: Path) -> dict[str, RemoteFile]:
        if not target.is_dir():
            return {}
        out = {}
        for p in sorted(target.rglob("*")):
            if p.is_file():
                rel = p.relative_to(target).as_posix()
                out[rel] = RemoteFile(rel, p.stat().st_size, sha256_file(p)[0])
        return out

    def _clean_leftovers(self, target: Path) -> None:
        # A crash can leave a stage or old folder behind; they are never the live one.
        for pattern in (f".{target.name}.stage-*", f".{target.name}.old-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)

    def _stage_and_swap(
        self,
        target: Path,
        current: dict[str, RemoteFile],
        repo_plan,
        plan: dict,
        generated: dict[str, bytes],
    ) -> dict[str, str]:
        """Build the new folder beside the live one and swap it in; returns {path: sha256}."""
        stage = target.with_name(f".{target.name}.stage-{uuid.uuid4().hex}")
        stage.mkdir()
        try:
            after: dict[str, str] = {}
            drop = set(repo_plan.deletes)
            same = set(repo_plan.unchanged)
            for rel, r in current.items():
                if rel in drop or rel in generated or (rel in plan and rel not in same):
                    continue
                dest = stage / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(target / rel, dest)  # same disk: no copy of kept files
                except OSError:
                    shutil.copy2(target / rel, dest)
                after[rel] = r.sha256 or ""
            for name, f in plan.items():
                if name not in after:
                    after[name] = copy_hashing(f.path, stage / name)[0]
            for name, data in generated.items():
                (stage / name).write_bytes(data)
                after[name] = hashlib.sha256(data).hexdigest()
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
        return after

    # -- collections -------------------------------------------------------------------

    def _collection_path(self, namespace: str, slug: str) -> Path:
        return self.root / ".collections" / namespace / f"{slug}.json"

    def ensure_collection(self, title: str, *, namespace: str) -> CollectionRef:
        split_repo_id(f"{namespace}/x")
        path = self._collection_path(namespace, _slug(title))
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(path.with_suffix("")):
            if not path.exists():
                self._write_collection(path, {"title": title, "items": []})
            data = json.loads(path.read_text())
        return CollectionRef(
            slug=f"{namespace}/{_slug(title)}", title=data["title"], url=path.as_uri(),
            items=tuple(data["items"]),
        )

    def add_to_collection(self, collection: CollectionRef, repo_id: str) -> CollectionRef:
        namespace, slug = collection.slug.split("/", 1)
        path = self._collection_path(namespace, slug)
        with self._lock(path.with_suffix("")):
            data = json.loads(path.read_text())
            items = list(dict.fromkeys([*data["items"], repo_id]))
            # Size order: the repo's model GGUFs (mmproj excluded), summed.
            items.sort(key=self._repo_size)
            data["items"] = items
            self._write_collection(path, data)
        return CollectionRef(collection.slug, data["title"], path.as_uri(), tuple(items))

    def _repo_size(self, repo_id: str) -> float:
        d = self.repo_dir(repo_id)
        if not d.is_dir():
            return float("inf")
        return float(sum(p.stat().st_size for p in d.glob("*.gguf") if "mmproj" not in p.name))

    @staticmethod
    def _write_collection(path: Path, data: dict) -> None:
        with atomic_output(path, mkdir=False) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
