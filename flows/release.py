"""The release flow: for every model of a family, put the source where every node reads it
(tiny:// fixtures into the store), plan, convert each safetensors shard for every recipe
(one task per shard), assemble each recipe's GGUF from the parts, write the projector,
compute the base model's log-prob records, evaluate each file in chunk ranges, merge,
gate and publish what passed.

Every step is content addressed in the artifact store, so a rerun (or `--resume`) does
only what is missing. Each task asks Ray for the memory and gets the timeout its plan
says it needs. One model's failure does not stop the others: the manifest is always
written, with each model's status and each task's node, peak memory and seconds, and the
flow run fails with a message naming the failed task and its error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.settings import PREFECT_API_URL, temporary_settings

from qatgguf.flows.runtime import ensure_prefect_server, eval_resources, ray_task_runner, task_resources
from qatgguf import release as core
from qatgguf import resources as budget
from qatgguf.config import EvalConfig, ModelConfig, ReleaseConfig, builtin_config_path, load_release_config
from qatgguf.tasks import release as t


class ReleaseFailed(RuntimeError):
    """At least one model of the release failed; the message names each failed task."""


def load_config(config: str) -> ReleaseConfig:
    """A path to a release config, or the name of a built-in one (`tiny-family`)."""
    p = Path(config)
    return load_release_config(p if p.suffix in (".yaml", ".yml") or p.exists() else builtin_config_path(config))


def release_context(cfg: ReleaseConfig, release_id: str) -> core.ReleaseContext:
    return core.ReleaseContext(
        family=cfg.family, release_id=release_id, store_url=cfg.store.url, store_endpoint=cfg.store.endpoint_url,
        hf_endpoint=cfg.sources.hf_endpoint, source_s3_endpoint=cfg.sources.s3_endpoint,
        split_max_size=cfg.publish.split_max_size,
    )


def artifact_slug(s: str) -> str:
    """`s` as a Prefect artifact key: lower case, every other character a dash."""
    return "".join(c if c.isalnum() else "-" for c in s.lower())


@dataclass
class ModelRun:
    """The futures of one checkpoint's pipeline (a model, or one of its variants such as
    the mobile mixture), in pipeline order, labelled by task name."""

    model: ModelConfig  # the checkpoint as a model (a variant is called <model>-<variant>)
    owner: str = ""  # the model whose repo and card it goes to
    futures: list[tuple[str, PrefectFuture, dict]] = field(default_factory=list)
    shards: list[PrefectFuture] = field(default_factory=list)
    plan: Any = None
    gates: dict[str, PrefectFuture] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  # recipe -> GGUFOutput (or its future)
    projector: Any = None
    # every output of the model, as a future (made by a task) or a value (found in the store)
    outputs: dict[str, Any] = field(default_factory=dict)
    publish: PrefectFuture | None = None
    progress_id: Any = None
    failed: str | None = None

    def add(self, label: str, future: PrefectFuture, declared: budget.TaskBudget | None = None) -> PrefectFuture:
        self.futures.append((label, future, declared.to_dict() if declared else {}))
        return future


def _submit(task_obj, declared: budget.TaskBudget, *args, cpus: int = 1, gpu: bool = False, **kwargs) -> PrefectFuture:
    with task_resources(memory=declared.memory, num_cpus=cpus, gpu=gpu):
        return task_obj.with_options(timeout_seconds=declared.timeout).submit(*args, **kwargs)


def _submit_model(run: ModelRun, cfg: ReleaseConfig, ctx: core.ReleaseContext, plan: core.ModelPlan,
                  settings: EvalConfig) -> None:
    """Submit the tasks of one model whose outputs the plan did not find in the store."""
    m = run.model
    recipes = (cfg.base_recipe, *cfg.recipes_for(m))
    shards: list[Any] = []
    for s in plan.shards:
        if s.index in plan.parts_done:
            shards.append(core.ShardResult(s.index, plan.parts_done[s.index], budget.StepStats(reused=True)))
            continue
        declared = budget.shard_budget(shard_bytes=s.size, largest_tensor=s.largest, part_bytes=s.part_bytes,
                                       row_block=64 * 1024 * 1024)
        f = _submit(t.quantize_shard, declared, ctx, m.name, plan.plan_refs, s.index, cpus=cfg.ray.shard_cpus)
        run.shards.append(run.add(f"quantize-{m.name}-shard-{s.index}", f, declared))
        shards.append(f)
    files: dict[str, Any] = {}
    for r in recipes:
        if r in plan.gguf_done:
            files[r] = plan.gguf_done[r]
            continue
        declared = budget.assemble_budget(gguf_bytes=plan.gguf_bytes[r])
        files[r] = run.add(f"assemble-{m.name}-{r}",
                           _submit(t.assemble_gguf, declared, ctx, m, r, plan.plan_refs[r], shards), declared)
    projector: Any = plan.mmproj_done
    # the repo holds one projector: the model's own checkpoint's (a variant shares the towers)
    if plan.mmproj is not None and projector is None and run.owner == m.name:
        declared = budget.assemble_budget(gguf_bytes=sum(plan.gguf_bytes.values()) // max(1, len(recipes)))
        projector = run.add(f"mmproj-{m.name}", _submit(t.mmproj, declared, ctx, m, plan.mmproj), declared)
    n_seq = max(1, cfg.eval.batch // cfg.eval.ctx)
    chunks = cfg.eval.chunks or 1000
    to_eval = [r for r in cfg.recipes_for(m) if r not in plan.eval_done]
    results: dict[str, Any] = {r: plan.eval_done[r] for r in cfg.recipes_for(m) if r in plan.eval_done}
    with eval_resources() as gpu:
        records = None
        if to_eval:
            declared = budget.eval_budget(gguf_bytes=plan.gguf_bytes[cfg.base_recipe], n_ctx=cfg.eval.ctx,
                                          n_seq=n_seq, n_vocab=plan.n_vocab, records_bytes=0, chunks=chunks)
            records = run.add(f"base-records-{m.name}",
                              _submit(t.base_records, declared, ctx, m.name, files[cfg.base_recipe], settings,
                                      cpus=cfg.eval.threads, gpu=gpu), declared)
        for r in to_eval:
            declared = budget.eval_budget(gguf_bytes=plan.gguf_bytes[r], n_ctx=cfg.eval.ctx, n_seq=n_seq,
                                          n_vocab=plan.n_vocab, records_bytes=chunks * cfg.eval.ctx * 2048,
                                          chunks=chunks // cfg.eval.range_tasks() + 1)
            n_parts = cfg.eval.range_tasks()
            ranges = [run.add(f"evaluate-{m.name}-{r}-range-{i}",
                              _submit(t.evaluate_range, declared, ctx, m.name, r, files[r], records, i,
                                      n_parts, settings, cpus=cfg.eval.threads, gpu=gpu), declared)
                      for i in range(n_parts)]
            results[r] = run.add(f"merge-eval-{m.name}-{r}",
                                 t.merge_eval.submit(ctx, m.name, r, ranges, files[r], records, n_parts))
    naive = cfg.naive_recipe if cfg.naive_recipe in results else None
    for r in cfg.recipes_for(m):
        # a published file other than the naive baseline must beat it: lower mean KLD, no larger
        beat = naive if naive and r != naive and r in cfg.publish_for(m) else None
        run.gates[r] = run.add(f"gate-{m.name}-{r}", t.gate.submit(
            ctx, m.name, r, results[r], files[r], cfg.gate_for(m),
            results[beat] if beat else None, files[beat] if beat else None))
    run.files = files
    run.projector = projector
    run.outputs = {"parts": shards, "files": files, "mmproj": projector, "evaluations": results,
                   "records": records}


def _submit_publish(model: ModelConfig, checkpoints: list[ModelRun], cfg: ReleaseConfig,
                    ctx: core.ReleaseContext) -> PrefectFuture:
    """One publish per model: its publishable files and the variants' in one commit."""
    main, *variants = checkpoints
    files = {r: main.files[r] for r in cfg.publish_for(main.model)}
    extra = {v.model.name: {"files": {r: v.files[r] for r in cfg.publish_for(v.model)}, "gates": v.gates}
             for v in variants}
    fut = t.publish.submit(ctx, cfg, model, files, main.gates, main.projector, main.files[cfg.base_recipe], extra)
    main.publish = main.add(f"publish-{model.name}", fut)
    return fut


def _outcome(label: str, future: PrefectFuture) -> tuple[str, Any, str | None]:
    """("completed", value, None), ("failed", None, "task: error") or ("not run", None,
    None) when the task never ran because an upstream task failed (reported there).

    The value comes from Ray, not from the API: a task's state in the API may lag behind
    its result."""
    from prefect.exceptions import UnfinishedRun

    future.wait()
    try:
        return "completed", future.result(raise_on_failure=True), None
    except UnfinishedRun:
        return "not run", None, None
    except BaseException as exc:  # noqa: BLE001 - any task error is reported, not raised here
        return "failed", None, f"{label}: {type(exc).__name__}: {exc}"


def _collect(run: ModelRun) -> dict:
    """A model's status for the manifest, and every task's node, memory and seconds."""
    tasks = []
    first_error = run.failed
    for label, fut, declared in run.futures:
        state, value, err = _outcome(label, fut)
        entry: dict[str, Any] = {"task": label, "state": state, "declared": declared}
        if err is not None:
            first_error = first_error or err
            entry["error"] = err
        stats = getattr(value, "stats", None)
        if stats is not None:
            entry.update(stats.to_dict())
        tasks.append(entry)
    out: dict[str, Any] = {"tasks": tasks, "repo": run.model.repo,
                           "outputs": _outputs(_resolved(run.outputs))}
    if run.plan is not None:
        # outputs the plan found in the store by their content keys: no task was submitted
        out["reused"] = {"shards": sorted(run.plan.parts_done), "files": sorted(run.plan.gguf_done),
                         "mmproj": run.plan.mmproj_done is not None, "evaluations": sorted(run.plan.eval_done)}
    if run.plan is not None:
        out["source"] = {"uri": run.plan.source.uri, "revision": run.plan.source.revision,
                         "files": {f.name: f.digest for f in run.plan.source.files}}
        out["plans"] = {r: {"key": p.key, "sha256": p.ref.sha256} for r, p in run.plan.plan_refs.items()}
        if run.plan.mmproj is not None:
            out["plans"]["mmproj"] = {"key": run.plan.mmproj.key, "sha256": run.plan.mmproj.ref.sha256}
    gates = {r: v for r, f in run.gates.items() if (v := _outcome(r, f)[1]) is not None}
    out["gates"] = gates
    publish_state, published, _ = (_outcome("publish", run.publish) if run.publish is not None
                                   else ("not run", None, None))
    out["published"] = published
    if first_error:
        out.update(status="failed", error=first_error)
    elif published and published.get("published"):
        out["status"] = "published"
    elif publish_state == "not run":
        out["status"] = "not published"  # another checkpoint of the model failed: the caller says which
    else:
        out["status"] = "not published (gate failed)"
    return out


def _resolved(v: Any) -> Any:
    """Values of completed futures (None for the others), inside dicts and lists."""
    if isinstance(v, PrefectFuture):
        return _outcome("", v)[1]
    if isinstance(v, dict):
        return {k: _resolved(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_resolved(x) for x in v]
    return v


def _outputs(v: Any) -> Any:
    """Content keys and digests of outputs, for the manifest."""
    if isinstance(v, dict):
        return {k: _outputs(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_outputs(x) for x in v]
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if hasattr(v, "__dataclass_fields__"):
        return {k: _outputs(getattr(v, k)) for k in v.__dataclass_fields__ if k != "stats"}
    return v


@flow(name="release", task_runner=ray_task_runner(), log_prints=True)
def release(
    config: str = "tiny-family",
    models: list[str] | None = None,
    recipes: list[str] | None = None,
    release_id: str | None = None,
    resume: bool = False,
) -> dict:
    """Release a model family: convert, quantize, evaluate, gate and publish."""
    logger = get_run_logger()
    cfg = load_config(config).resolved(Path.cwd()).select(models=models, recipes=recipes)
    if resume and not release_id:
        raise ValueError("resume needs the release_id of the release to continue")
    ctx = release_context(cfg, release_id or core.new_release_id(cfg))
    core.start_release(ctx, cfg, resume=resume)
    settings = cfg.eval
    logger.info("release %s of %s: %d models%s", ctx.release_id, cfg.family, len(cfg.models),
                " (resumed)" if resume else "")
    return run_models(cfg, ctx, settings, cfg.models)


def run_models(cfg: ReleaseConfig, ctx: core.ReleaseContext, settings: EvalConfig,
               models: tuple[ModelConfig, ...]) -> dict:
    """Submit every model's pipeline, follow the shards' progress, collect, write the
    manifest and artifacts; raise ReleaseFailed naming failed tasks when a model failed."""
    logger = get_run_logger()
    runs = {ck.name: ModelRun(ck, owner=m.name) for m in models for ck in cfg.checkpoints(m)}
    plan_futures = {}
    for m in (r.model for r in runs.values()):
        declared = budget.plan_budget(small_files=256 * 1024 * 1024)
        src = runs[m.name].add(f"source-{m.name}", _submit(t.prepare_source, declared, ctx, m))
        plan_futures[m.name] = runs[m.name].add(
            f"plan-{m.name}", _submit(t.plan_model, declared, ctx, m, (cfg.base_recipe, *cfg.recipes_for(m)), src,
                                      cfg.base_recipe, settings, cfg.eval.range_tasks()), declared)
    by_future = {f: name for name, f in plan_futures.items()}
    for f in as_completed(list(plan_futures.values())):
        run = runs[by_future[f]]
        state, plan, _ = _outcome("", f)
        if state != "completed":
            continue  # reported by _collect
        run.plan = plan
        _submit_model(run, cfg, ctx, run.plan, settings)
        todo = len(run.shards)
        run.progress_id = create_progress_artifact(
            progress=0.0 if todo else 100.0, key=f"{artifact_slug(cfg.family)}-{artifact_slug(run.model.name)}-shards",
            description=f"{run.model.name}: 0 of {todo} shards to convert done "
                        f"({run.plan.n_shards - todo} of {run.plan.n_shards} already in the store)")
    # one publish per model, once every checkpoint of it is submitted
    for m in models:
        cks = [runs[ck.name] for ck in cfg.checkpoints(m)]
        if all(ck.plan is not None for ck in cks):
            _submit_publish(m, cks, cfg, ctx)
    # follow the shards, model by model in completion order
    owner = {f: run for run in runs.values() for f in run.shards}
    done = {name: 0 for name in runs}
    for f in as_completed(list(owner)):
        run = owner[f]
        done[run.model.name] += 1
        n = len(run.shards)
        update_progress_artifact(run.progress_id, progress=100.0 * done[run.model.name] / n,
                                 description=f"{run.model.name}: {done[run.model.name]} of {n} shards done")
    wait([f for run in runs.values() for _, f, _ in run.futures])

    summary = {name: _collect(run) for name, run in runs.items()}
    for name, s in summary.items():
        run = runs[name]
        s["model"] = run.owner
        if run.owner == name and s["status"] == "not published":
            # not published because another checkpoint of the model failed
            other = next((f"{n}: {x['error']}" for n, x in summary.items()
                          if runs[n].owner == name and x["status"] == "failed"), "a checkpoint was not planned")
            s.update(status="failed", error=other)
        if run.owner != name:  # a variant: its files went out with its model's publish
            owner = summary[run.owner]
            if s["status"] == "failed":
                pass
            elif owner["status"] == "failed":
                s.update(status="failed", error=f"{run.owner}: {owner['error']}")
            else:
                stems = {core.gguf_name(run.model, r).removesuffix(".gguf") for r in cfg.publish_for(run.model)}
                published = (owner.get("published") or {}).get("files") or []
                s["status"] = ("published" if any(f.startswith(tuple(stems)) for f in published)
                               else "not published (gate failed)")
        if runs[name].plan is not None:
            # what the nightly compares: the inputs this release actually used
            s["fingerprint"] = core.model_fingerprint(cfg, runs[name].model, runs[name].plan.source)
    manifest = core.write_manifest(ctx, cfg, summary)
    tables = core.release_tables(cfg, summary)
    result = core.release_result(cfg, release_id=ctx.release_id, manifest_uri=manifest.uri, summary=summary,
                                 tables=tables)
    rows, failed, gate_failed = result["rows"], result["failed"], result["gate_failed"]
    slug = artifact_slug(cfg.family)
    if rows:
        create_table_artifact(key=f"{slug}-eval", table=rows, description=f"Release {ctx.release_id}: every file")
    for table in tables:
        create_table_artifact(key=f"{slug}-{artifact_slug(table.title)}", table=table.records(),
                              description=f"Release {ctx.release_id}: {table.title}")
    create_markdown_artifact(key=f"{slug}-release", markdown=core.release_report(
        family=cfg.family, release_id=ctx.release_id, summary=summary, manifest_uri=manifest.uri, tables=tables))
    if gate_failed:
        logger.warning("gate failed, not published: %s", ", ".join(gate_failed))
    if failed:
        raise ReleaseFailed(f"release {ctx.release_id}: {len(failed)} of {len(summary)} model(s) failed "
                            f"(manifest {manifest.uri}): " + " | ".join(failed))
    return result


def run_release(
    config: str, *, models: list[str] | None = None, recipes: list[str] | None = None,
    release_id: str | None = None, resume: bool = False,
) -> tuple[str, str, Any]:
    """Run the release flow against the Prefect server found (or started) on this machine;
    returns (API URL, release id, final flow state). The `qatgguf release` command calls this."""
    api_url = ensure_prefect_server()
    # Prefect reads its settings once at import: point this process (and, through the
    # task runner, the Ray workers) at the server explicitly.
    os.environ["PREFECT_API_URL"] = api_url
    cfg = load_config(config)
    release_id = release_id or core.new_release_id(cfg.resolved(Path.cwd()).select(models=models, recipes=recipes))
    runner = ray_task_runner(os.environ.get("RAY_ADDRESS") or cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        state = release.with_options(task_runner=runner)(
            config=config, models=models, recipes=recipes, release_id=release_id, resume=resume, return_state=True
        )
    return api_url, release_id, state

