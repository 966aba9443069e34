"""The release's own records in the store: start, manifest, latest release and the
fingerprints the nightly compares."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from qatgguf.config import ModelConfig, ReleaseConfig
from qatgguf.convert.source import SourceRef
from qatgguf.errors import ConfigError
from qatgguf.keys import (
    digest,
    recipe_digest,
)
from qatgguf.release.context import ReleaseContext
from qatgguf.store import ArtifactRef


def model_fingerprint(cfg: ReleaseConfig, model: ModelConfig, source: SourceRef) -> str:
    """Everything that decides a model's published files and numbers: the source snapshot,
    the recipes (their files), the tool versions, the evaluation settings and the gate."""
    from qatgguf.keys import tool_versions

    recipes = (cfg.base_recipe, *cfg.recipes_for(model))
    return digest({"source": source.digest(), "recipes": {r: recipe_digest(r) for r in recipes},
                   "tools": tool_versions(), "eval": cfg.eval.model_dump(), "gate": cfg.gate_for(model).model_dump(),
                   "model": model.model_dump(), "split": cfg.publish.split_max_size,
                   "card": {"license": cfg.license, "quantized_by": cfg.quantized_by}})


def start_release(ctx: ReleaseContext, cfg: ReleaseConfig, *, resume: bool) -> dict:
    """Record (or, resuming, check) the release's config; returns the started record."""
    store = ctx.store()
    key = ctx.key("started.json")
    config = json.loads(cfg.model_dump_json())
    existing = store.stat(key)
    if resume:
        if existing is None:
            raise ConfigError(f"release {ctx.release_id} of {cfg.family} was never started in {ctx.store_url}; "
                              "drop --resume to start a new one")
        started = store.get_json(existing.uri)
        if started["config_digest"] != digest(config):
            raise ConfigError(f"release {ctx.release_id} was started with another config (digest "
                              f"{started['config_digest'][:12]}); resume it with the same config and selection")
        return started
    if existing is not None:
        raise ConfigError(f"release {ctx.release_id} already exists in {ctx.store_url}; use --resume to continue it")
    started = {"family": cfg.family, "release_id": ctx.release_id, "config": config, "config_digest": digest(config),
               "started": datetime.now(UTC).isoformat()}
    store.put_json(started, key, exclusive=True)
    return started


def latest_release(ctx: ReleaseContext) -> dict | None:
    """The record of the family's last release that published (`releases/<family>/latest.json`)."""
    store = ctx.store()
    ref = store.stat(f"releases/{ctx.family}/latest.json")
    return store.get_json(ref.uri) if ref is not None else None


def write_manifest(ctx: ReleaseContext, cfg: ReleaseConfig, models: dict[str, dict]) -> ArtifactRef:
    """The release's manifest: per model its status (published, or failed and why), source
    revision and digests, every content key and digest it used, each task's node, memory
    and seconds; the tool versions and recipe digests. When a model published, the
    family's `latest.json` points here."""
    from qatgguf.keys import tool_versions

    recipes = sorted({cfg.base_recipe, *(r for m in cfg.models for r in cfg.recipes_for(m))})
    data = {"family": cfg.family, "release_id": ctx.release_id, "finished": datetime.now(UTC).isoformat(),
            "tools": tool_versions(), "recipes": {r: recipe_digest(r) for r in recipes},
            "config": json.loads(cfg.model_dump_json()), "models": models}
    store = ctx.store()
    ref = store.put_json(data, ctx.key("manifest.json"))
    published = {m: d["fingerprint"] for m, d in models.items()
                 if d.get("status") == "published" and d.get("fingerprint")}
    if published:
        prev = latest_release(ctx) or {"models": {}}
        merged = {**prev.get("models", {}),
                  **{m: {"release_id": ctx.release_id, "fingerprint": fp, "manifest": ref.uri}
                     for m, fp in published.items()}}
        store.put_json({"release_id": ctx.release_id, "manifest": ref.uri, "models": merged},
                       f"releases/{ctx.family}/latest.json")
    return ref
