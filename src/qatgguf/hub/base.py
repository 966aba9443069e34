"""The publisher contract and the Hub's limits, checked before anything is written."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from qatgguf.errors import PublishError

GB = 10**9
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
CARD_PATH = "README.md"
# Names the Hub manages itself; a publish never writes or deletes them.
RESERVED_PATHS = frozenset({CARD_PATH, ".gitattributes"})


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    url: str
    commit: str
    files: tuple[str, ...]


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
        self,
        repo_id: str,
        files: Sequence[Path],
        card_text: str,
        *,
        commit_message: str,
    ) -> PublishResult:
        """Make the repo hold exactly `files` (at their base names) plus README.md."""
        ...


def split_repo_id(repo_id: str) -> tuple[str, str]:
    org, sep, name = repo_id.partition("/")
    if not sep or not _REPO_PART_RE.match(org) or not _REPO_PART_RE.match(name) or ".." in repo_id:
        raise PublishError(
            f"repo id {repo_id!r} is not valid; use 'org/name' with letters, digits, '-', '_', '.'"
        )
    return org, name


def plan_files(repo_id: str, files: Sequence[Path | str], *, limits: HubLimits) -> dict[str, Path]:
    """Map repo paths to local files; raise PublishError before any upload if a file is
    missing, two files share a name, a file is over the size limit or the commit would
    hold too many files."""
    split_repo_id(repo_id)
    plan: dict[str, Path] = {}
    for item in files:
        path = Path(item)
        name = path.name
        if not path.is_file():
            raise PublishError(f"{path}: cannot publish to {repo_id}: not a regular file")
        if name in RESERVED_PATHS:
            raise PublishError(
                f"{path}: cannot publish a file named {name!r} to {repo_id}: the card is "
                "passed as card_text and .gitattributes is the Hub's; rename the file"
            )
        if name in plan:
            raise PublishError(
                f"{path}: two files named {name!r} ({plan[name]} and {path}) for {repo_id}; "
                "repo paths are base names, so names must be unique"
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
        plan[name] = path
    # README.md rides in the same commit.
    if len(plan) + 1 >= limits.max_files_per_commit:
        raise PublishError(
            f"{repo_id}: {len(plan) + 1} files in one commit; the Hub needs fewer than "
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
