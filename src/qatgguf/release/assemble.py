"""Release steps: assemble a recipe's GGUF from its parts, and write the projector."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from qatgguf.config import ModelConfig
from qatgguf.convert.source import open_reader
from qatgguf.errors import ConfigError
from qatgguf.keys import (
    CONVERTER_VERSION,
    EVAL_EXCLUDED_KEYS,
    cas_key,
    content_key,
    metadata_digest,
)
from qatgguf.release.context import ReleaseContext, fetch_object, quant_label, scratch
from qatgguf.release.refs import GGUFOutput, PlanRef, ShardResult, load_mmproj_plan, load_plan
from qatgguf.resources import measure
from qatgguf.store import ArtifactRef

log = logging.getLogger(__name__)


def stored_output(store, key: str, kind: str, recipe: str) -> GGUFOutput | None:
    index = store.stat(cas_key(kind, key, "files.json"))
    if index is None:
        return None
    d = json.loads(store.get_bytes(index.uri))
    return GGUFOutput(recipe=recipe, key=key, files=tuple(ArtifactRef.from_dict(f) for f in d["files"]),
                      eval_digest=d["eval_digest"], types=d.get("types", {}))


def _store_output(store, key: str, kind: str, recipe: str, paths: Sequence[Path], eval_digest: str,
                  types: dict[str, int] | None = None) -> GGUFOutput:
    files = tuple(store.put_file(p, cas_key(kind, key, p.name), exclusive=True) for p in paths)
    # the index is written last: an output exists once it does
    store.put_json({"files": [f.to_dict() for f in files], "eval_digest": eval_digest, "types": types or {}},
                   cas_key(kind, key, "files.json"), exclusive=True)
    return GGUFOutput(recipe=recipe, key=key, files=files, eval_digest=eval_digest, types=types or {})


def split_limit(plan, max_file: int | None) -> int | None:
    """The tensor bytes per split file that keep every file within `max_file` bytes: the
    splitting rule counts tensor data only (as llama.cpp's --split-max-size does), and
    the first file also carries the whole metadata (the tokenizer is megabytes)."""
    if max_file is None:
        return None
    from qatgguf.gguf.writer import header_nbytes

    # a tensor's entry in the header has the same size whatever its type (a u32), so a
    # grid: auto tensor, typed only once its shard task ran, counts with any type it may take
    jobs = plan.tensors
    reserve = header_nbytes(plan.kvs, plan.tensor_infos({n: jobs[n].allowed[0] for n in plan.auto_tensors}))
    if reserve >= max_file:
        raise ConfigError(f"publish.split_max_size {max_file} is below the GGUF header's {reserve} bytes; raise it")
    return max_file - reserve


def gguf_name(model: ModelConfig, recipe: str) -> str:
    return f"{model.file_prefix}-{quant_label(recipe)}.gguf"


def gguf_keys(plan, part_keys: Sequence[str], *, name: str, split: int | None) -> tuple[str, str]:
    """(content key of the GGUF file(s), evaluation digest): the first covers the parts,
    all metadata, the split size and the name; the second the parts and the metadata that
    can change tokens or logits (not the chat template)."""
    key = content_key("gguf", parts=list(part_keys), metadata=metadata_digest(plan.kvs), split=split, name=name,
                      converter=CONVERTER_VERSION)
    eval_digest = content_key("eval-identity", parts=list(part_keys),
                              metadata=metadata_digest(plan.kvs, exclude=EVAL_EXCLUDED_KEYS))
    return key, eval_digest


def assemble_gguf(ctx: ReleaseContext, model: ModelConfig, recipe: str, plan: PlanRef,
                  shards: Sequence[ShardResult]) -> GGUFOutput:
    """Write the GGUF (or its split files, above the config's per-file limit) of one recipe
    from the shard parts, streaming; reused when its content key is in the store."""
    from qatgguf.convert import assemble, read_manifest

    store = ctx.store()
    with measure() as stats:
        p = load_plan(store, plan.ref)
        parts = [s.parts[recipe] for s in sorted(shards, key=lambda s: s.index)]
        name = gguf_name(model, recipe)
        key, eval_digest = gguf_keys(p, [pr.key for pr in parts], name=name, split=ctx.split_max_size)
        found = stored_output(store, key, "gguf", recipe)
        if found is not None:
            stats.reused = True
            return replace(found, stats=stats)
        with scratch(f"{model.name}-{recipe}-asm-") as work:
            local = [fetch_object(store, pr.ref, work / f"{i:05d}", stats) for i, pr in enumerate(parts)]
            files = assemble(p, local, work / "out" / name, split_max_size=split_limit(p, ctx.split_max_size))
            types = Counter(t["type"] for part in local for t in read_manifest(part)["tensors"])
            out = _store_output(store, key, "gguf", recipe, files, eval_digest, dict(sorted(types.items())))
            log.info("%s %s: %s (%d file(s), %d bytes)", model.name, recipe, name, len(files), out.size)
    return replace(out, stats=stats)


def mmproj_model(ctx: ReleaseContext, model: ModelConfig, plan: PlanRef) -> GGUFOutput:
    """Write the vision (and audio) projector `mmproj-BF16.gguf` as llama.cpp keeps it
    (F16/BF16, never quantized), fetching only the shards that hold tower tensors."""
    from qatgguf.convert.mmproj import mmproj_filename, mmproj_shards, write_mmproj_plan

    store = ctx.store()
    with measure() as stats:
        p = load_mmproj_plan(store, plan.ref)
        key = content_key("mmproj", plan=plan.key, converter=CONVERTER_VERSION)
        found = stored_output(store, key, "mmproj", "mmproj")
        if found is not None:
            stats.reused = True
            return replace(found, stats=stats)
        with scratch(f"{model.name}-mmproj-") as work:
            reader = open_reader(p.source, ctx.source_options())
            root = p.source.local_dir or work / "src"
            for f in mmproj_shards(p):
                reader.fetch(f, root)  # a local source's file is checked in place
            stats.fetched = reader.bytes_read
            path = write_mmproj_plan(p, work / mmproj_filename(p.outtype), root=root)
            out = _store_output(store, key, "mmproj", "mmproj", [path], key)
    return replace(out, stats=stats)
