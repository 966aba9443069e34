"""Nightly re-quantization (see deployment.yaml): release only what changed upstream.

For each model the nightly resolves the source's current revision (a Hub commit sha, S3
ETags; no weights read) and compares the model's fingerprint (source digests, recipe
files, tool versions, evaluation and gate settings) with the family's last published
release (`releases/<family>/latest.json`). Unchanged models run no task at all; when
nothing changed the run ends in seconds with an artifact saying so. Changed models go
through the release flow's pipeline, where content keys make a new chat template cost an
assembly and a publish (no quantization, no evaluation), and one re-uploaded shard cost
exactly that shard's quantization.
"""

from __future__ import annotations

from pathlib import Path

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.settings import PREFECT_API_URL, temporary_settings

from qatgguf.flows.release import artifact_slug, load_config, release, release_context
from qatgguf.flows.runtime import ensure_prefect_server, ray_task_runner
from qatgguf import release as core


@flow(name="nightly", log_prints=True)
def nightly(config: str = "tiny-family", models: list[str] | None = None) -> dict:
    """Release the models of the family whose inputs changed since their last release.
    The check runs no task and starts no Ray; changed models go through the release flow
    (a subflow on the Ray cluster)."""
    logger = get_run_logger()
    cfg = load_config(config).resolved(Path.cwd()).select(models=models)
    ctx = release_context(cfg, core.new_release_id(cfg))
    latest = core.latest_release(ctx) or {"models": {}}
    fingerprints: dict[str, str] = {}
    changed = []
    for m in cfg.models:
        # a model changed when any of its checkpoints (the model, its variants) did
        for ck in cfg.checkpoints(m):
            source = core.source_snapshot(ctx, core.prepare_source(ctx, ck))
            fingerprints[ck.name] = core.model_fingerprint(cfg, ck, source)
            last = latest["models"].get(ck.name)
            if last is None or last["fingerprint"] != fingerprints[ck.name]:
                logger.info("%s changed since %s (source %s@%s)", ck.name,
                            last["release_id"] if last else "its first release", source.uri, source.revision[:12])
                changed.append(m)
                break
    if not changed:
        since = sorted({v["release_id"] for v in latest["models"].values()})
        text = f"# {cfg.family}: unchanged since release {', '.join(since)}\n\nNo source, recipe or tool changed; " \
               "nothing was converted, evaluated or published."
        create_markdown_artifact(key=f"{artifact_slug(cfg.family)}-nightly", markdown=text,
                                 description=f"unchanged since release {', '.join(since)}")
        logger.info("unchanged since release %s", ", ".join(since))
        return {"unchanged": True, "since": since, "release_id": None, "models": {}}
    names = [m.name for m in changed]
    runner = ray_task_runner(os.environ.get("RAY_ADDRESS") or cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    result = release.with_options(task_runner=runner)(config=config, models=names, release_id=ctx.release_id)
    return {**result, "unchanged": False, "changed": names}


def run_nightly(config: str, *, models: list[str] | None = None) -> tuple[str, Any]:
    """Run the nightly flow against the Prefect server found (or started) on this machine;
    returns (API URL, final flow state). `qatgguf nightly` calls this."""
    api_url = ensure_prefect_server()
    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        state = nightly(config=config, models=models, return_state=True)
    return api_url, state
