"""What the pipeline owns in a repo, and how one release changes it.

Every publish writes `qatgguf-manifest.json` at the root of the repo: one entry per file
the pipeline published (path, sha256, size, recipe, release id). A later release deletes
only files that the manifest lists *and* that this release replaces (same recipe, new
build); everything else stays:

- a recipe that failed its gate in this release keeps the file an earlier release
  published, and the manifest (and so the card) says which release that file is from;
- files someone added by hand (notes, images, another quant) are never listed, so never
  deleted; a listed file whose content was changed by hand is no longer the pipeline's
  and is left alone too;
- README.md (the card), its assets and the manifest are rewritten on every publish.

The same plan drives `HubPublisher` (one commit) and `LocalHubPublisher` (one folder swap).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from qatgguf.errors import PublishError

log = logging.getLogger(__name__)

MANIFEST_PATH = "qatgguf-manifest.json"
MANIFEST_VERSION = 1
CARD_PATH = "README.md"
ASSET_RECIPE = "card"  # the recipe name of card assets (the plot)

FileKind = Literal["model", "mmproj", "asset"]
_KIND_ORDER = {"model": 0, "mmproj": 1, "asset": 2}


@dataclass(frozen=True)
class ManifestEntry:
    """One file the pipeline published. `recipe` groups files that replace each other
    (a split set, or the mmproj); `release` is the release id that published it."""

    path: str
    sha256: str
    size: int
    recipe: str
    release: str
    kind: FileKind = "model"
    quant: str | None = None


@dataclass(frozen=True)
class Manifest:
    repo_id: str
    entries: tuple[ManifestEntry, ...] = ()
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        ordered = sorted(
            self.entries, key=lambda e: (_KIND_ORDER[e.kind], e.recipe, e.path)
        )
        object.__setattr__(self, "entries", tuple(ordered))
        paths = [e.path for e in self.entries]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise PublishError(f"{self.repo_id}: manifest lists {dup} more than once")

    def by_path(self) -> dict[str, ManifestEntry]:
        return {e.path: e for e in self.entries}

    def to_json(self) -> str:
        """Deterministic text (same entries, same bytes), so an unchanged release changes
        nothing in the repo."""
        data = {
            "version": self.version,
            "repo_id": self.repo_id,
            "files": [{k: v for k, v in asdict(e).items() if v is not None} for e in self.entries],
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str) -> Manifest:
        """Parse a manifest read from a repo. Raises PublishError naming `where`."""
        try:
            data = json.loads(text)
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {MANIFEST_VERSION}")
            entries = tuple(ManifestEntry(**item) for item in data["files"])
            for e in entries:
                if e.kind not in _KIND_ORDER:
                    raise ValueError(f"kind {e.kind!r} of {e.path!r}")
            return cls(repo_id=str(data["repo_id"]), entries=entries)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PublishError(
                f"{where}/{MANIFEST_PATH}: not a qatgguf manifest ({exc}); fix or delete the "
                "file in the repo (the next publish then owns no earlier files)"
            ) from None


@dataclass(frozen=True)
class ReleaseFile:
    """A local file this release publishes, at its base name in the repo."""

    path: Path
    recipe: str
    kind: FileKind = "model"
    quant: str | None = None

    @property
    def repo_path(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class ReleaseUpload:
    """What one release publishes to one repo.

    `card` renders README.md from the manifest the repo will hold after the commit (so
    the card can say which release each file comes from); `assets` are files the card
    embeds (the plot), committed beside it.
    """

    release_id: str
    files: tuple[ReleaseFile, ...]
    card: Callable[[Manifest], str]
    assets: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "assets", tuple(self.assets))


@dataclass(frozen=True)
class RemoteFile:
    """A file in the repo as listed: `sha256` is known for LFS files (and every local
    file); a regular Hub file has its git blob id instead."""

    path: str
    size: int
    sha256: str | None
    git_oid: str | None = None

    def holds(self, data: bytes) -> bool:
        """Whether the file's content is `data`."""
        if self.size != len(data):
            return False
        if self.sha256 is not None:
            return self.sha256 == hashlib.sha256(data).hexdigest()
        # ref: git hash-object: sha1("blob <size>\0" + content)
        return self.git_oid == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoPlan:
    """The change one release makes: what to write, what to delete, what stays."""

    manifest: Manifest
    card_text: str
    writes: tuple[str, ...]  # repo paths whose content changes (files, assets, card, manifest)
    deletes: tuple[str, ...]
    kept: tuple[ManifestEntry, ...]  # earlier releases' files this release keeps
    unchanged: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return bool(self.writes or self.deletes)


def _owned(previous: Manifest | None, remote: Mapping[str, RemoteFile]) -> list[ManifestEntry]:
    """Entries of the previous manifest that the repo still holds unchanged."""
    if previous is None:
        return []
    owned = []
    for e in previous.entries:
        r = remote.get(e.path)
        if r is None:
            log.info("%s: listed in the manifest but no longer in the repo; dropped", e.path)
        elif r.sha256 is not None and r.sha256 != e.sha256:
            log.warning("%s: changed by hand since release %s; left alone", e.path, e.release)
        else:
            owned.append(e)
    return owned


def plan_repo(
    repo_id: str,
    upload: ReleaseUpload,
    *,
    digests: Mapping[str, tuple[str, int]],
    remote: Mapping[str, RemoteFile],
    previous: Manifest | None,
) -> tuple[RepoPlan, dict[str, bytes]]:
    """Plan one release against the repo's current state.

    `digests` maps each repo path of `upload.files` to (sha256, size); `remote` is the
    repo's file listing and `previous` its manifest (None when it has none).
    Returns the plan and the bytes of the generated files (card, manifest, assets).
    """
    new_entries = [
        ManifestEntry(
            path=f.repo_path,
            sha256=digests[f.repo_path][0],
            size=digests[f.repo_path][1],
            recipe=f.recipe,
            release=upload.release_id,
            kind=f.kind,
            quant=f.quant,
        )
        for f in upload.files
    ]
    new_entries += [
        ManifestEntry(
            path=name,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            recipe=ASSET_RECIPE,
            release=upload.release_id,
            kind="asset",
        )
        for name, data in upload.assets
    ]
    new_paths = {e.path for e in new_entries}
    replaced = {e.recipe for e in new_entries} | {ASSET_RECIPE}
    kept: list[ManifestEntry] = []
    deletes: list[str] = []
    for e in _owned(previous, remote):
        if e.path in new_paths:
            continue  # rewritten below
        if e.recipe in replaced:
            deletes.append(e.path)
        else:
            kept.append(e)
    for path in sorted(new_paths & set(remote)):
        if previous is None or path not in previous.by_path():
            log.warning("%s/%s: a file not published by qatgguf is replaced", repo_id, path)
    manifest = Manifest(repo_id=repo_id, entries=(*new_entries, *kept))
    card_text = upload.card(manifest)
    generated: dict[str, bytes] = {
        CARD_PATH: card_text.encode(),
        MANIFEST_PATH: manifest.to_json().encode(),
        **dict(upload.assets),
    }
    writes: list[str] = []
    unchanged: list[str] = []
    for e in new_entries:
        if e.kind == "asset":
            continue
        r = remote.get(e.path)
        if r is not None and r.sha256 == e.sha256 and r.size == e.size:
            unchanged.append(e.path)
        else:
            writes.append(e.path)
    for path, data in generated.items():
        r = remote.get(path)
        if r is not None and r.holds(data):
            unchanged.append(path)
        else:
            writes.append(path)
    plan = RepoPlan(
        manifest=manifest,
        card_text=card_text,
        writes=tuple(sorted(writes)),
        deletes=tuple(sorted(deletes)),
        kept=tuple(kept),
        unchanged=tuple(sorted(unchanged)),
    )
    return plan, generated


def check_release_paths(upload: ReleaseUpload, reserved: Sequence[str]) -> None:
    """Asset names must not collide with files or the names the publisher manages."""
    names = [f.repo_path for f in upload.files]
    for name, data in upload.assets:
        if not isinstance(data, bytes):
            raise PublishError(f"card asset {name!r}: content must be bytes")
        if name in reserved or name in names or "/" in name or name.startswith("."):
            raise PublishError(
                f"card asset {name!r}: the name is taken (reserved: {sorted(reserved)}) or is "
                "not a plain file name; rename it"
            )
