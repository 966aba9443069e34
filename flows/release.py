"""The release flow: every model of a family, in parallel, from checkpoint to published GGUF.

Per model: plan and validate every recipe; one quantization task per safetensors shard
(all recipes from one read of the shard); assemble each recipe's GGUF from the parts;
write the vision projector (mmproj) where the model has towers;
compute the base model's log-prob records once; evaluate each quant in chunk ranges;
merge; gate; publish what passed. All tasks are submitted up front, so models and
recipes overlap on the Ray cluster; futures carry only URIs, digests and metric dicts.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.runtime import ensure_prefect_server, eval_resources, ray_task_runner, shard_resources
from qatgguf import release as core
from qatgguf.config import ReleaseConfig, builtin_config_path, load_release_config
from tasks import release as t


def load_config(config: str) -> ReleaseConfig:
    """A path to a release config, or the name of a built-in one (`tiny-family`)."""
    p = Path(config)
    return load_release_config(p if p.suffix in (".yaml", ".yml") or p.exists() else builtin_config_path(config))


@flow(name="release", task_runner=ray_task_runner(), log_prints=True)
def release(
    config: str = "tiny-family",
    models: list[str] | None = None,
    recipes: list[str] | None = None,
    release_id: str | None = None,
) -> dict:
    """Release a model family: convert, quantize, evaluate, gate and publish."""
    logger = get_run_logger()
    cfg = load_config(config).resolved(Path.cwd()).select(models=models, recipes=recipes)
    ctx = core.ReleaseContext(
        family=cfg.family,
        release_id=release_id or core.new_release_id(cfg),
        store_url=cfg.store.url,
        store_endpoint=cfg.store.endpoint_url,
    )
    settings = core.EvalSettings(
        corpus=cfg.eval.corpus, ctx=cfg.eval.ctx, chunks=cfg.eval.chunks, threads=cfg.eval.threads,
        batch=cfg.eval.batch,
    )
    logger.info("release %s of %s: %d models", ctx.release_id, cfg.family, len(cfg.models))

    all_recipes = {m.name: (cfg.base_recipe, *cfg.recipes_for(m)) for m in cfg.models}
    plan_f = {m.name: t.plan_model.submit(ctx, m, all_recipes[m.name]) for m in cfg.models}

    publish_f = {}
    gate_f: dict[str, dict] = {}
    for m in cfg.models:
        plan = plan_f[m.name].result()  # cheap; needed to know how many shards to fan out
        with shard_resources():
            parts = [t.quantize_shard.submit(ctx, m.name, plan.plans, i) for i in range(plan.n_shards)]
        files = {
            r: t.assemble_gguf.submit(ctx, m, r, plan.plans[r], parts) for r in all_recipes[m.name]
        }
        projector = t.mmproj.submit(ctx, m) if plan.has_mmproj else None
        records = t.base_records.submit(ctx, m.name, files[cfg.base_recipe], settings)
        gate_f[m.name] = {}
        for r in cfg.recipes_for(m):
            with eval_resources():
                ranges = [
                    t.evaluate_range.submit(ctx, m.name, r, files[r], records, i, cfg.eval.chunk_tasks, settings)
                    for i in range(cfg.eval.chunk_tasks)
                ]
            merged = t.merge_eval.submit(ctx, m.name, r, ranges, files[r])
            gate_f[m.name][r] = t.gate.submit(ctx, m.name, r, merged, cfg.gate_for(m))
        quant_files = {r: files[r] for r in cfg.recipes_for(m)}
        publish_f[m.name] = t.publish.submit(ctx, cfg, m, quant_files, gate_f[m.name], projector or ())

    wait(list(publish_f.values()))
    summary = {}
    rows = []
    for m in cfg.models:
        published = publish_f[m.name].result()
        gates = {r: f.result() for r, f in gate_f[m.name].items()}
        summary[m.name] = {"published": published, "gates": gates}
        for r, g in gates.items():
            res = g["result"]
            rows.append(
                {
                    "model": m.name,
                    "method": core.quant_label(r),
                    "size_MB": round(res.get("quant_size", 0) / 1e6, 3),
                    "mean_KLD": round(res["mean_kld"], 6),
                    "KLD_99.9%": round(res["kld_99_9"], 6),
                    "top1_%": round(100 * res["same_top_p"], 2),
                    "PPL": round(res["ppl_quant"], 4),
                    "gate": "PASS" if g["passed"] else "FAIL: " + "; ".join(g["reasons"]),
                }
            )
    manifest = core.write_manifest(ctx, cfg, summary)
    create_table_artifact(key=f"{_slug(cfg.family)}-eval", table=rows, description=f"Release {ctx.release_id}")
    create_markdown_artifact(key=f"{_slug(cfg.family)}-release", markdown=_report(cfg, ctx, summary, manifest.uri))
    failed = [f"{m}/{r}" for m, s in summary.items() for r, g in s["gates"].items() if not g["passed"]]
    if failed:
        logger.warning("gate failed, not published: %s", ", ".join(failed))
    return {"release_id": ctx.release_id, "manifest": manifest.uri, "rows": rows, "models": summary,
            "gate_failed": failed}


def run_release(
    config: str, *, models: list[str] | None = None, recipes: list[str] | None = None,
    release_id: str | None = None,
) -> tuple[str, dict]:
    """Run the release flow against the Prefect server found (or started) on this machine;
    returns (API URL, flow result). The `qatgguf release` command calls this."""
    api_url = ensure_prefect_server()
    # Prefect reads its settings once at import: point this process (and, through the
    # task runner, the Ray workers) at the server explicitly.
    os.environ["PREFECT_API_URL"] = api_url
    ray = load_config(config).ray  # RAY_ADDRESS, when set, still wins over the config
    runner = ray_task_runner(os.environ.get("RAY_ADDRESS") or ray.address, num_cpus=ray.num_cpus)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        result = release.with_options(task_runner=runner)(
            config=config, models=models, recipes=recipes, release_id=release_id
        )
    return api_url, result


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower())


def _report(cfg: ReleaseConfig, ctx: core.ReleaseContext, summary: dict, manifest_uri: str) -> str:
    lines = [f"# Release {ctx.release_id} of {cfg.family}", "", f"Manifest: `{manifest_uri}`", ""]
    for name, s in summary.items():
        pub = s["published"]
        state = f"published to `{pub['repo']}`" if pub["published"] else "**not published**"
        lines.append(f"## {name}: {state}")
        for r, g in s["gates"].items():
            verdict = "PASS" if g["passed"] else "FAIL — " + "; ".join(g["reasons"])
            lines.append(f"- {core.quant_label(r)}: {verdict}")
        lines.append("")
    return "\n".join(lines)
