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

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.release import _slug, load_config, release_context, run_models
from flows.runtime import ray_task_runner
from qatgguf import release as core


@flow(name="nightly", task_runner=ray_task_runner(), log_prints=True)
def nightly(config: str = "tiny-family", models: list[str] | None = None) -> dict:
    """Release the models of the family whose inputs changed since their last release."""
    logger = get_run_logger()
    cfg = load_config(config).resolved(Path.cwd()).select(models=models)
    ctx = release_context(cfg, core.new_release_id(cfg))
    latest = core.latest_release(ctx) or {"models": {}}
    fingerprints: dict[str, str] = {}
    changed = []
    for m in cfg.models:
        source = core.source_snapshot(ctx, core.prepare_source(ctx, m))
        fingerprints[m.name] = core.model_fingerprint(cfg, m, source)
        last = latest["models"].get(m.name)
        if last is None or last["fingerprint"] != fingerprints[m.name]:
            changed.append(m)
            logger.info("%s changed since %s (source %s@%s)", m.name,
                        last["release_id"] if last else "its first release", source.uri, source.revision[:12])
    if not changed:
        since = sorted({v["release_id"] for v in latest["models"].values()})
        text = f"# {cfg.family}: unchanged since release {', '.join(since)}\n\nNo source, recipe or tool changed; " \
               "nothing was converted, evaluated or published."
        create_markdown_artifact(key=f"{_slug(cfg.family)}-nightly", markdown=text,
                                 description=f"unchanged since release {', '.join(since)}")
        logger.info("unchanged since release %s", ", ".join(since))
        return {"unchanged": True, "since": since, "release_id": None, "models": {}}
    cfg = cfg.select(models=[m.name for m in changed])
    core.start_release(ctx, cfg, resume=False)
    settings = core.EvalSettings(corpus=cfg.eval.corpus, ctx=cfg.eval.ctx, chunks=cfg.eval.chunks,
                                 threads=cfg.eval.threads, batch=cfg.eval.batch)
    result = run_models(cfg, ctx, settings, cfg.models, fingerprints=fingerprints)
    return {**result, "unchanged": False, "changed": [m.name for m in changed]}
