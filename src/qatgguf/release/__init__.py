"""The steps of a release, as plain functions over sources, store keys and digests.

Each function here is the body of one Prefect task (tasks/). It reads its inputs only from
the source (at the revision the plan pinned) or the artifact store, works in a private
scratch folder on the machine it runs on, writes its outputs to the store under a
*content key* (`qatgguf.keys`) and returns small values: references, digests, metric
dicts and the step's `StepStats` (seconds, peak RSS, bytes fetched, whether it reused an
output already in the store). A step whose output key is already in the store does no
work, so a killed release resumes where it stopped and a nightly run redoes only what
changed. Nothing here knows about Prefect or Ray, so every step can be run on its own.

Store layout, below the store's root::

    cas/<kind>/<key[:2]>/<key>/...        content-addressed outputs (plans, parts, GGUFs,
                                          projectors, base records, evaluation ranges and
                                          results, tiny sources)
    releases/<family>/<release_id>/started.json, manifest.json, <model>/gate-<recipe>.json,
                                   <model>/published.json
    releases/<family>/latest.json          the last release that published, for the nightly
"""

from __future__ import annotations

from qatgguf.release.assemble import assemble_gguf, gguf_keys, gguf_name, mmproj_model, split_limit
from qatgguf.release.context import ReleaseContext, new_release_id, quant_label, scratch
from qatgguf.release.evaluate import (
    base_records,
    base_records_key,
    eval_key,
    eval_range,
    eval_summary_key,
    merge_eval,
    runner_settings,
)
from qatgguf.release.gate import gate
from qatgguf.release.manifest import (
    latest_release,
    model_fingerprint,
    start_release,
    write_manifest,
)
from qatgguf.release.plan import plan_model
from qatgguf.release.publish import publish_model, variant_table
from qatgguf.release.refs import (
    BaseRecordsRef,
    GGUFOutput,
    ModelPlan,
    PartRef,
    PlanRef,
    RangeOutput,
    ShardInfo,
    ShardResult,
    load_mmproj_plan,
    load_plan,
)
from qatgguf.release.shards import part_key, quantize_shard
from qatgguf.release.sources import prepare_source, source_snapshot
from qatgguf.release.summary import (
    format_release_rows,
    release_report,
    release_result,
    release_rows,
    release_tables,
)

__all__ = [
    "scratch",
    "new_release_id",
    "quant_label",
    "ReleaseContext",
    "PlanRef",
    "ShardInfo",
    "PartRef",
    "ShardResult",
    "GGUFOutput",
    "ModelPlan",
    "BaseRecordsRef",
    "RangeOutput",
    "load_plan",
    "load_mmproj_plan",
    "prepare_source",
    "source_snapshot",
    "plan_model",
    "part_key",
    "quantize_shard",
    "split_limit",
    "gguf_name",
    "gguf_keys",
    "assemble_gguf",
    "mmproj_model",
    "runner_settings",
    "eval_key",
    "base_records_key",
    "eval_summary_key",
    "base_records",
    "eval_range",
    "merge_eval",
    "gate",
    "publish_model",
    "variant_table",
    "model_fingerprint",
    "start_release",
    "latest_release",
    "write_manifest",
    "release_rows",
    "release_result",
    "format_release_rows",
    "release_report",
    "release_tables",
]
