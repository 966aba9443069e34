"""Release step: plan every recipe of one model and find what the store already holds."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from qatgguf.config import EvalConfig, ModelConfig
from qatgguf.convert.source import open_reader
from qatgguf.keys import (
    CONVERTER_VERSION,
    cas_key,
    content_key,
    recipe_digest,
)
from qatgguf.release.assemble import gguf_keys, gguf_name, stored_output
from qatgguf.release.context import ReleaseContext, find_stored
from qatgguf.release.evaluate import base_records_key, eval_summary_key
from qatgguf.release.refs import ModelPlan, PartRef, PlanRef, ShardInfo, load_plan
from qatgguf.release.shards import part_key
from qatgguf.release.sources import source_snapshot
from qatgguf.resources import measure

log = logging.getLogger(__name__)


def _src_bytes(job) -> int:
    import math

    from qatgguf.convert.safetensors import DTYPES

    if job.src_dtype is None:
        return 0
    return math.prod(job.src_shape) * DTYPES[job.src_dtype][0]


def plan_model(ctx: ReleaseContext, model: ModelConfig, recipes: Sequence[str], *, source: str,
               base_recipe: str, settings: EvalConfig, n_parts: int) -> ModelPlan:
    """Plan every recipe (and the projector) of one model from the source's small files and
    shard headers, and validate the checkpoint before any heavy work. Plans are content
    addressed: an unchanged source and recipe reuse the stored plan without reading a
    header. The plan also says which outputs are already in the store (parts, GGUFs,
    projector, evaluations), computed from their content keys."""
    from qatgguf.convert import ConversionPlan
    from qatgguf.convert.mmproj import plan_mmproj
    from qatgguf.convert.plan import plan_recipes

    store = ctx.store()
    with measure() as stats:
        ref = source_snapshot(ctx, source)
        keys = {r: content_key("plan", source=ref.digest(), recipe=recipe_digest(r), converter=CONVERTER_VERSION)
                for r in recipes}
        mm_key = content_key("mmproj-plan", source=ref.digest(), outtype="bf16", converter=CONVERTER_VERSION)
        found = {r: find_stored(store, cas_key("plans", k, "plan.json")) for r, k in keys.items()}
        mm_found = find_stored(store, cas_key("plans", mm_key, "mmproj-plan.json"))
        missing = [r for r, f in found.items() if f is None]
        reader = open_reader(ref, ctx.source_options())
        if missing:
            for r, plan in plan_recipes(ref, missing, reader=reader).items():
                found[r] = store.put_bytes(plan.to_json().encode(), cas_key("plans", keys[r], "plan.json"),
                                           exclusive=True)
        if mm_found is None:
            mm = plan_mmproj(ref, outtype="bf16", source_options=ctx.source_options(), reader=reader)
            mm_found = store.put_bytes((mm.to_json() if mm else "null").encode(),
                                       cas_key("plans", mm_key, "mmproj-plan.json"), exclusive=True)
        stats.fetched = reader.bytes_read
        stats.reused = not missing and reader.bytes_read == 0
        plans: dict[str, ConversionPlan] = {r: load_plan(store, found[r]) for r in recipes}
        has_mm = store.get_bytes(mm_found.uri) != b"null"
        # what is already stored
        part_keys = {r: [part_key(p, i) for i in range(len(p.shards))] for r, p in plans.items()}
        parts_done: dict[int, dict[str, PartRef]] = {}
        any_plan = next(iter(plans.values()))
        for i in range(len(any_plan.shards)):
            refs = {r: find_stored(store, cas_key("parts", part_keys[r][i], "part")) for r in recipes}
            if all(refs.values()):
                parts_done[i] = {r: PartRef(part_keys[r][i], x) for r, x in refs.items()}
        gguf_done = {}
        for r, p in plans.items():
            key, _ = gguf_keys(p, part_keys[r], name=gguf_name(model, r), split=ctx.split_max_size)
            out = stored_output(store, key, "gguf", r)
            if out is not None:
                gguf_done[r] = out
        mmproj_done = (stored_output(store, content_key("mmproj", plan=mm_key, converter=CONVERTER_VERSION),
                                      "mmproj", "mmproj") if has_mm else None)
        eval_done = {}
        base_digest = gguf_keys(plans[base_recipe], part_keys[base_recipe], name="", split=None)[1]
        records_key = base_records_key(base_digest, settings)
        for r in recipes:
            if r == base_recipe:
                continue
            quant_digest = gguf_keys(plans[r], part_keys[r], name="", split=None)[1]
            res = store.stat(cas_key("eval", eval_summary_key(quant_digest, records_key, n_parts), "result.json"))
            if res is not None:
                eval_done[r] = store.get_json(res.uri)
    shards = []
    for i, sj in enumerate(any_plan.shards):
        largest = max((_src_bytes(t) for t in sj.tensors), default=0)
        part_bytes = sum(t.nbytes for p in plans.values() for t in p.shards[i].tensors)
        shards.append(ShardInfo(index=i, file=sj.file, size=sj.size, digest=sj.digest, largest=largest,
                                part_bytes=part_bytes))
    n_vocab = next((len(kv.value) for kv in any_plan.kvs if kv.key == "tokenizer.ggml.tokens"), 0)
    log.info("planned %s: %d shards (%d already converted), recipes %s, source %s@%s", model.name, len(shards),
             len(parts_done), ", ".join(recipes), ref.uri, ref.revision[:12])
    return ModelPlan(model=model.name, source=ref,
                     plan_refs={r: PlanRef(r, keys[r], found[r]) for r in recipes}, shards=tuple(shards),
                     mmproj=PlanRef("mmproj", mm_key, mm_found) if has_mm else None,
                     gguf_bytes={r: sum(t.nbytes for s in p.shards for t in s.tensors) for r, p in plans.items()},
                     n_vocab=n_vocab, parts_done=parts_done, gguf_done=gguf_done, mmproj_done=mmproj_done,
                     eval_done=eval_done, stats=stats)
