"""Release step: put a model's source where every node reads it, pinned to a revision."""

from __future__ import annotations

import logging

from qatgguf.config import ModelConfig
from qatgguf.convert.source import SourceRef, snapshot
from qatgguf.errors import ConfigError
from qatgguf.keys import (
    cas_key,
)
from qatgguf.paths import cache_root
from qatgguf.release.context import ReleaseContext

log = logging.getLogger(__name__)


def prepare_source(ctx: ReleaseContext, model: ModelConfig) -> str:
    """The source URI tasks read: the configured one, except `tiny://NAME`, which is built
    once (or found in this machine's fixture cache) and uploaded to the store under its
    spec hash, so every task of every node reads the same bytes from there; a later
    release finds it in the store and builds nothing."""
    if not model.source.startswith("tiny://"):
        return model.source
    from qatgguf.convert.source import is_checkpoint_file
    from qatgguf.fixtures import FAMILY, build_family, spec_hash

    name = model.source.removeprefix("tiny://")
    if name not in FAMILY:
        raise ConfigError(f"model {model.name}: tiny://{name} is not a built-in fixture; known: {sorted(FAMILY)}")
    prefix = cas_key("sources", spec_hash(FAMILY[name]), name)
    store = ctx.store()
    if store.stat(prefix + ".json") is None:
        path = build_family(cache_root() / "fixtures", models=[name])[name]
        files = {}
        for p in sorted(path.iterdir()):
            if p.is_file() and is_checkpoint_file(p.name):
                files[p.name] = store.put_file(p, f"{prefix}/{p.name}", exclusive=True).sha256
        # written last: the upload is complete when this exists
        store.put_json({"fixture": name, "files": files}, prefix + ".json", exclusive=True)
        log.info("tiny://%s built and stored at %s (%d files)", name, store.uri_for(prefix), len(files))
    return store.uri_for(prefix)


def source_snapshot(ctx: ReleaseContext, source_uri: str) -> SourceRef:
    """The source pinned to its current revision (no weights read)."""
    return snapshot(source_uri, options=ctx.source_options())
