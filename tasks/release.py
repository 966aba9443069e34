"""Prefect tasks of a release: each is one call into `qatgguf.release`, plus retries,
naming and (through the flow) Ray resources. Arguments and results are small values:
configs, URIs, digests and metric dicts."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from qatgguf import release as core
from qatgguf.config import GateConfig, ModelConfig, ReleaseConfig
from qatgguf.store import ArtifactRef

# Results are small and recomputed from the store; hashing inputs buys nothing.
_common = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="plan-model", task_run_name="plan-{model.name}", retries=1, **_common)
def plan_model(ctx: core.ReleaseContext, model: ModelConfig, recipes: Sequence[str]) -> core.ModelPlan:
    return core.plan_model(ctx, model, recipes)


@task(name="quantize-shard", task_run_name="quantize-{model}-shard-{index}", retries=2, retry_delay_seconds=2,
      **_common)
def quantize_shard(ctx: core.ReleaseContext, model: str, plans: dict[str, str], index: int) -> dict[str, ArtifactRef]:
    return core.run_shard(ctx, model, plans, index)


@task(name="assemble-gguf", task_run_name="assemble-{model.name}-{recipe}", retries=1, **_common)
def assemble_gguf(
    ctx: core.ReleaseContext,
    model: ModelConfig,
    recipe: str,
    plan_uri: str,
    parts: Sequence[dict[str, ArtifactRef]],
) -> list[ArtifactRef]:
    return core.assemble_model(ctx, model, recipe, plan_uri, parts)


@task(name="mmproj", task_run_name="mmproj-{model.name}", retries=1, **_common)
def mmproj(ctx: core.ReleaseContext, model: ModelConfig) -> list[ArtifactRef]:
    return core.mmproj_model(ctx, model)


@task(name="base-records", task_run_name="base-records-{model}", retries=1, **_common)
def base_records(
    ctx: core.ReleaseContext, model: str, base: Sequence[ArtifactRef], settings: core.EvalSettings
) -> core.BaseRecordsRef:
    return core.base_records(ctx, base, settings)


@task(name="evaluate-range", task_run_name="evaluate-{model}-{recipe}-range-{part}", retries=1, **_common)
def evaluate_range(
    ctx: core.ReleaseContext,
    model: str,
    recipe: str,
    quant: Sequence[ArtifactRef],
    records: core.BaseRecordsRef,
    part: int,
    n_parts: int,
    settings: core.EvalSettings,
) -> ArtifactRef | None:
    return core.eval_range(ctx, model, recipe, quant, records, part, n_parts, settings)


@task(name="merge-eval", task_run_name="merge-eval-{model}-{recipe}", **_common)
def merge_eval(
    ctx: core.ReleaseContext, model: str, recipe: str, ranges: Sequence[ArtifactRef | None], quant: Sequence[ArtifactRef]
) -> dict:
    return core.merge_eval(ctx, model, recipe, ranges, quant)


@task(name="gate", task_run_name="gate-{model}-{recipe}", **_common)
def gate(ctx: core.ReleaseContext, model: str, recipe: str, result: dict, thresholds: GateConfig) -> dict:
    return core.gate(ctx, model, recipe, result, thresholds)


@task(name="publish", task_run_name="publish-{model.name}", retries=2, retry_delay_seconds=5, **_common)
def publish(
    ctx: core.ReleaseContext,
    cfg: ReleaseConfig,
    model: ModelConfig,
    files: dict[str, Sequence[ArtifactRef]],
    gates: dict[str, dict],
    mmproj: Sequence[ArtifactRef] = (),
) -> dict:
    return core.publish_model(ctx, cfg, model, files, gates, mmproj=mmproj)
