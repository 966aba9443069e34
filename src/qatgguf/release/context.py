"""What every release step shares: the release's identity and store (`ReleaseContext`),
private scratch folders, and fetching stored objects to local files."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qatgguf.config import ReleaseConfig
from qatgguf.convert.source import SourceOptions
from qatgguf.keys import (
    digest,
)
from qatgguf.paths import cache_root
from qatgguf.release.refs import GGUFOutput
from qatgguf.resources import StepStats
from qatgguf.store import ArtifactRef, open_store

log = logging.getLogger(__name__)


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private working folder on this machine, removed afterwards whatever happens."""
    root = cache_root() / "work"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def new_release_id(cfg: ReleaseConfig) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{digest(json.loads(cfg.model_dump_json()))[:8]}"


def quant_label(recipe: str) -> str:
    """The file-name suffix of a recipe: q4_0 -> Q4_0, UD-Q4_K_XL stays, bf16 -> BF16."""
    return recipe.upper() if not recipe.upper().startswith("UD-") else recipe


@dataclass(frozen=True)
class ReleaseContext:
    """What every step needs to find its inputs and outputs; small and picklable, and free
    of secrets (tokens and keys come from the environment of the machine a step runs on)."""

    family: str
    release_id: str
    store_url: str
    store_endpoint: str | None = None
    hf_endpoint: str | None = None
    source_s3_endpoint: str | None = None
    split_max_size: int | None = None

    def store(self):
        return open_store(self.store_url, endpoint_url=self.store_endpoint)

    def key(self, *parts: str) -> str:
        return "/".join(("releases", self.family, self.release_id, *parts))

    def source_options(self) -> SourceOptions:
        return SourceOptions(hf_endpoint=self.hf_endpoint, s3_endpoint=self.source_s3_endpoint or self.store_endpoint)


def find_stored(store, key: str) -> ArtifactRef | None:
    return store.stat(key)


def fetch_object(store, ref: ArtifactRef, dest: Path, stats: StepStats) -> Path:
    """Download a stored artifact, its sha256 checked against the reference."""
    p = store.get_file(ref.uri, dest / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
    stats.fetched += ref.size
    return p


def fetch_gguf(store, out: GGUFOutput, work: Path, stats: StepStats) -> Path:
    """Download a (possibly split) GGUF; returns the path llama.cpp opens (first split)."""
    return [fetch_object(store, r, work, stats) for r in out.files][0]
