"""Prefect tasks of a release: each is one call into `qatgguf.release`, plus retries,
naming, and what only the runtime knows (the Ray node a step ran on, whether Ray gave it
a GPU). Memory, CPUs and timeouts are set per call by the flow from the plan. Arguments
and results are small values: configs, references, digests, metric dicts and step stats."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler

from qatgguf import release as core
from qatgguf.config import EvalConfig, GateConfig, ModelConfig, ReleaseConfig

# The core's INFO lines (tensors, types, grid exactness, bytes, seconds) go to each task's
# log in the Prefect UI: Prefect attaches its API handler to the `qatgguf` logger
# (PREFECT_LOGGING_EXTRA_LOGGERS, which the task runner forwards to Ray workers), and the
# logger must let INFO through.
logging.getLogger("qatgguf").setLevel(logging.INFO)

# Outputs are content addressed in the artifact store (the steps check it themselves), so
# Prefect's result cache buys nothing; results are small and recomputed from the store.
_common = dict(cache_policy=NO_CACHE, persist_result=False)
R = TypeVar("R")


def _on_node(result: R) -> R:
    """Record the Ray node that ran the step in its stats (for the release manifest), and
    send the step's log lines to the Prefect API before the task returns: Prefect's log
    worker sends them in the background, and a Ray worker stopped before it does (the
    driver exits, a node goes away) would take them with it."""
    stats = getattr(result, "stats", None)
    if stats is not None:
        try:
            import ray

            if ray.is_initialized():
                stats.host = f"{stats.host}/{ray.get_runtime_context().get_node_id()[:12]}"
        except Exception:  # noqa: BLE001 - outside a Ray worker the host name stands
            pass
    APILogHandler().flush()
    return result


@task(name="prepare-source", task_run_name="source-{model.name}", retries=1, **_common)
def prepare_source(ctx: core.ReleaseContext, model: ModelConfig) -> str:
    return _on_node(core.prepare_source(ctx, model))


@task(name="plan-model", task_run_name="plan-{model.name}", retries=1, **_common)
def plan_model(ctx: core.ReleaseContext, model: ModelConfig, recipes: Sequence[str], source: str,
               base_recipe: str, settings: EvalConfig, n_parts: int) -> core.ModelPlan:
    return _on_node(core.plan_model(ctx, model, recipes, source=source, base_recipe=base_recipe, settings=settings,
                                    n_parts=n_parts))


@task(name="quantize-shard", task_run_name="quantize-{model}-shard-{index}", retries=1, retry_delay_seconds=2,
      **_common)
def quantize_shard(ctx: core.ReleaseContext, model: str, plan_refs: dict[str, core.PlanRef], index: int
                   ) -> core.ShardResult:
    return _on_node(core.quantize_shard(ctx, model, plan_refs, index))


@task(name="assemble-gguf", task_run_name="assemble-{model.name}-{recipe}", retries=1, **_common)
def assemble_gguf(ctx: core.ReleaseContext, model: ModelConfig, recipe: str, plan: core.PlanRef,
                  shards: Sequence[core.ShardResult]) -> core.GGUFOutput:
    return _on_node(core.assemble_gguf(ctx, model, recipe, plan, shards))


@task(name="mmproj", task_run_name="mmproj-{model.name}", retries=1, **_common)
def mmproj(ctx: core.ReleaseContext, model: ModelConfig, plan: core.PlanRef) -> core.GGUFOutput:
    return _on_node(core.mmproj_model(ctx, model, plan))


def _gpu() -> bool:
    """Whether Ray gave this task a GPU (then every layer is offloaded)."""
    try:
        import ray

        return bool(ray.is_initialized() and ray.get_gpu_ids())
    except Exception:  # noqa: BLE001
        return False


@task(name="base-records", task_run_name="base-records-{model}", retries=1, **_common)
def base_records(ctx: core.ReleaseContext, model: str, base: core.GGUFOutput, settings: EvalConfig
                 ) -> core.BaseRecordsRef:
    return _on_node(core.base_records(ctx, base, settings, gpu=_gpu()))


@task(name="evaluate-range", task_run_name="evaluate-{model}-{recipe}-range-{part}", retries=1, **_common)
def evaluate_range(ctx: core.ReleaseContext, model: str, recipe: str, quant: core.GGUFOutput,
                   records: core.BaseRecordsRef, part: int, n_parts: int, settings: EvalConfig
                   ) -> core.RangeOutput:
    return _on_node(core.eval_range(ctx, model=model, recipe=recipe, quant=quant, records=records, part=part,
                                    n_parts=n_parts, settings=settings, gpu=_gpu()))


@task(name="merge-eval", task_run_name="merge-eval-{model}-{recipe}", **_common)
def merge_eval(ctx: core.ReleaseContext, model: str, recipe: str, ranges: Sequence[core.RangeOutput],
               quant: core.GGUFOutput, records: core.BaseRecordsRef, n_parts: int) -> dict:
    return _on_node(core.merge_eval(ctx, model=model, recipe=recipe, ranges=ranges, quant=quant, records=records,
                                    n_parts=n_parts))


@task(name="gate", task_run_name="gate-{model}-{recipe}", **_common)
def gate(ctx: core.ReleaseContext, model: str, recipe: str, result: dict, quant: core.GGUFOutput,
         thresholds: GateConfig, naive_result: dict | None = None, naive: core.GGUFOutput | None = None) -> dict:
    return _on_node(core.gate(ctx, model=model, recipe=recipe, result=result, quant=quant, thresholds=thresholds,
                              naive_result=naive_result, naive=naive))


@task(name="publish", task_run_name="publish-{model.name}", retries=2, retry_delay_seconds=5, **_common)
def publish(ctx: core.ReleaseContext, cfg: ReleaseConfig, model: ModelConfig, files: dict[str, core.GGUFOutput],
            gates: dict[str, dict], mmproj: core.GGUFOutput | None = None, base: core.GGUFOutput | None = None,
            variants: dict[str, dict] | None = None) -> dict:
    return _on_node(core.publish_model(ctx, cfg, model, files, gates, mmproj=mmproj, base=base,
                                       variants=variants or {}))
