"""Release step: convert one safetensors shard into a part per recipe (content keyed)."""

from __future__ import annotations

import logging
from dataclasses import asdict

from qatgguf.convert.source import open_reader, remove_fetched
from qatgguf.keys import (
    CONVERTER_VERSION,
    cas_key,
    content_key,
    kernel_versions,
    recipe_digest,
)
from qatgguf.release.context import ReleaseContext, find_stored, scratch
from qatgguf.release.refs import PartRef, PlanRef, ShardResult, load_plan
from qatgguf.resources import measure

log = logging.getLogger(__name__)


def part_key(plan, index: int) -> str:
    """The content key of shard `index`'s part under `plan`: the source shard's digest, the
    plan's entries for it, the recipe and the versions of the kernels it uses."""
    sj = plan.shards[index]
    kernels = [(t.qtype, t.grid) for t in sj.tensors if t.grid != "auto"]
    # a grid: auto tensor may be written by any of its candidates' grid encoders, or as
    # the recipe's type when it is on no grid
    kernels += [(c, "qat") for t in sj.tensors if t.grid == "auto" for c in t.candidates]
    kernels += [(t.qtype, None) for t in sj.tensors if t.grid == "auto"]
    return content_key("part", shard=sj.file, shard_digest=sj.digest,
                       jobs=[asdict(t) for t in sj.tensors], recipe=recipe_digest(plan.recipe),
                       kernels=kernel_versions(kernels), converter=CONVERTER_VERSION)


def quantize_shard(ctx: ReleaseContext, model: str, plan_refs: dict[str, PlanRef], index: int) -> ShardResult:
    """Convert one safetensors shard for every recipe whose part is not in the store yet:
    fetch exactly that shard at the planned revision (digest checked), convert it once per
    recipe, store each part under its content key, delete the shard. Scratch space: the
    shard plus one part."""
    from qatgguf.convert import convert_shard

    store = ctx.store()
    out: dict[str, PartRef] = {}
    with measure() as stats, scratch(f"{model}-shard{index}-") as work:
        loaded = {r: load_plan(store, p.ref) for r, p in plan_refs.items()}
        keys = {r: part_key(plan, index) for r, plan in loaded.items()}
        for r, k in keys.items():
            ref = find_stored(store, cas_key("parts", k, "part"))
            if ref is not None:
                out[r] = PartRef(k, ref)
        todo = [r for r in loaded if r not in out]
        if not todo:
            stats.reused = True
            log.info("%s shard %d: every part already stored (%s)", model, index, ", ".join(sorted(out)))
            return ShardResult(index, out, stats)
        plan0 = loaded[todo[0]]
        sj = plan0.shards[index]
        reader = open_reader(plan0.source, ctx.source_options())
        local = reader.fetch(sj.file, work) if sj.file else None
        stats.fetched = reader.bytes_read
        try:
            for r in todo:
                part = work / f"{r}.part"
                info = convert_shard(loaded[r], index, part, shard=local)
                out[r] = PartRef(keys[r], store.put_file(part, cas_key("parts", keys[r], "part"), exclusive=True))
                log.info("%s shard %d %s: %d tensors, %d bytes -> %s", model, index, r, info.n_tensors,
                         info.nbytes, keys[r][:12])
                part.unlink()
        finally:
            if local is not None:
                remove_fetched(local, plan0.source)
    return ShardResult(index, out, stats)
