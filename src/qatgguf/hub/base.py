"""The publisher contract, its results, the retry policy and the Hub's limits, checked
before anything is written."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from qatgguf.errors import PublishError
from qatgguf.hub.manifest import CARD_PATH, MANIFEST_PATH, ReleaseFile, ReleaseUpload

GB = 10**9
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
# Names the publisher manages itself: the card, the Hub's attributes, the manifest. A
# release never passes a file of these names.
RESERVED_PATHS = frozenset({CARD_PATH, ".gitattributes", MANIFEST_PATH})


@dataclass(frozen=True)
class PublishResult:
    """What a publish did. `committed` is False when the repo already held exactly this
    release (no commit made); `attempts` counts commit attempts and `retries` says why
    each retry happened (HTTP status or fault), for logs and reports."""

    repo_id: str
    url: str
    commit: str
    files: tuple[str, ...]
    committed: bool = True
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    attempts: int = 1
    retries: tuple[str, ...] = ()


@dataclass(frozen=True)
class CollectionRef:
    """A collection of repos: its id (`slug`), title, URL and items in order."""

    slug: str
    title: str
    url: str
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryPolicy:
    """How long one publish keeps trying. A commit refused because another commit moved
    the branch (HTTP 412) is recomputed and retried at once; HTTP 429/5xx and dropped
    connections wait (the server's Retry-After when it sends one, else base_wait doubling
    up to max_wait). Either way at most `max_attempts` commit attempts, and never past
    `max_seconds` in all."""

    max_attempts: int = 6
    max_seconds: float = 900.0
    base_wait: float = 1.0
    max_wait: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_seconds <= 0 or self.base_wait < 0:
            raise PublishError(
                f"RetryPolicy: max_attempts >= 1, max_seconds > 0 and base_wait >= 0 are "
                f"needed; got {self}"
            )


@dataclass(frozen=True)
class HubLimits:
    """ref: huggingface.co/docs/hub/storage-limits: files must stay under 50 GB; the Hub
    recommends files under 20 GB (we split GGUFs there) and fewer than 100 files per
    commit."""

    max_file_size: int = 20 * GB
    hard_file_size: int = 50 * GB
    max_files_per_commit: int = 100

    def __post_init__(self) -> None:
        if self.max_file_size > self.hard_file_size:
            raise PublishError(
                f"HubLimits: max_file_size {self.max_file_size} is above the Hub's hard "
                f"limit {self.hard_file_size}; lower it"
            )


@runtime_checkable
class Publisher(Protocol):
    def publish(
        self, repo_id: str, upload: ReleaseUpload, *, commit_message: str
    ) -> PublishResult:
        """Publish one release's files, its card and the manifest; delete only files the
        manifest lists and this release replaces (see `qatgguf.hub.manifest`)."""
        ...

    def ensure_collection(self, title: str, *, namespace: str) -> CollectionRef:
        """The collection `title` of `namespace`, created when missing."""
        ...

    def add_to_collection(self, collection: CollectionRef, repo_id: str) -> CollectionRef:
        """Add `repo_id` if missing and put the collection's repos in size order."""
        ...


def split_repo_id(repo_id: str) -> tuple[str, str]:
    org, sep, name = repo_id.partition("/")
    if not sep or not _REPO_PART_RE.match(org) or not _REPO_PART_RE.match(name) or ".." in repo_id:
        raise PublishError(
            f"repo id {repo_id!r} is not valid; use 'org/name' with letters, digits, '-', '_', '.'"
        )
    return org, name


def plan_files(
    repo_id: str, files: Sequence[ReleaseFile], *, limits: HubLimits
) -> dict[str, ReleaseFile]:
    """Map repo paths to the release's files; raise PublishError before any upload if a
    file is missing, two files share a name, a file is over the size limit or the commit
    would hold too many files."""
    split_repo_id(repo_id)
    plan: dict[str, ReleaseFile] = {}
    for item in files:
        path = Path(item.path)
        name = path.name
        if not path.is_file():
            raise PublishError(f"{path}: cannot publish to {repo_id}: not a regular file")
        if name in RESERVED_PATHS:
            raise PublishError(
                f"{path}: cannot publish a file named {name!r} to {repo_id}: the publisher "
                f"writes {sorted(RESERVED_PATHS)} itself; rename the file"
            )
        if name in plan:
            raise PublishError(
                f"{path}: two files named {name!r} ({plan[name].path} and {path}) for "
                f"{repo_id}; repo paths are base names, so names must be unique"
            )
        size = path.stat().st_size
        if size >= limits.hard_file_size:
            raise PublishError(
                f"{path}: {size} bytes is over the Hub's hard limit of "
                f"{limits.hard_file_size} bytes per file; split it (gguf-split, "
                f"split_max_size={limits.max_file_size})"
            )
        if size > limits.max_file_size:
            raise PublishError(
                f"{path}: {size} bytes is over the {limits.max_file_size}-byte split size for "
                f"Hub files; re-assemble with split_max_size={limits.max_file_size}"
            )
        plan[name] = item
    # README.md and the manifest ride in the same commit.
    if len(plan) + 2 >= limits.max_files_per_commit:
        raise PublishError(
            f"{repo_id}: {len(plan) + 2} files in one commit; the Hub needs fewer than "
            f"{limits.max_files_per_commit}; use larger splits or publish in several repos"
        )
    if not plan:
        raise PublishError(f"{repo_id}: no files to publish; pass at least one GGUF")
    return plan


def scrub(text: str, secrets: Sequence[str | None]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
