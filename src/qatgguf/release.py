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

import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from qatgguf.config import EvalConfig, GateConfig, ModelConfig, ReleaseConfig
from qatgguf.convert.source import SourceOptions, SourceRef, open_reader, remove_fetched, snapshot
from qatgguf.errors import ConfigError
from qatgguf.keys import (
    CONVERTER_VERSION,
    EVAL_EXCLUDED_KEYS,
    cas_key,
    content_key,
    digest,
    kernel_versions,
    metadata_digest,
    recipe_digest,
)
from qatgguf.paths import cache_root
from qatgguf.resources import StepStats, measure
from qatgguf.store import ArtifactRef, open_store

log = logging.getLogger(__name__)


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private working folder on this machine, removed afterwards whatever happens."""
    root = cache_root() / "work"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def new_release_id(cfg: ReleaseConfig) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{digest(json.loads(cfg.model_dump_json()))[:8]}"


def quant_label(recipe: str) -> str:
    """The file-name suffix of a recipe: q4_0 -> Q4_0, UD-Q4_K_XL stays, bf16 -> BF16."""
    return recipe.upper() if not recipe.upper().startswith("UD-") else recipe


@dataclass(frozen=True)
class ReleaseContext:
    """What every step needs to find its inputs and outputs; small and picklable, and free
    of secrets (tokens and keys come from the environment of the machine a step runs on)."""

    family: str
    release_id: str
    store_url: str
    store_endpoint: str | None = None
    hf_endpoint: str | None = None
    source_s3_endpoint: str | None = None
    split_max_size: int | None = None

    def store(self):
        return open_store(self.store_url, endpoint_url=self.store_endpoint)

    def key(self, *parts: str) -> str:
        return "/".join(("releases", self.family, self.release_id, *parts))

    def source_options(self) -> SourceOptions:
        return SourceOptions(hf_endpoint=self.hf_endpoint, s3_endpoint=self.source_s3_endpoint or self.store_endpoint)


def _reuse(store, key: str) -> ArtifactRef | None:
    return store.stat(key)


def _fetch(store, ref: ArtifactRef, dest: Path, stats: StepStats) -> Path:
    """Download a stored artifact, its sha256 checked against the reference."""
    p = store.get_file(ref.uri, dest / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
    stats.fetched += ref.size
    return p


# ---------------------------------------------------------------------------- sources


def prepare_source(ctx: ReleaseContext, model: ModelConfig) -> str:
    """The source URI tasks read: the configured one, except `tiny://NAME`, which is built
    once (or found in this machine's fixture cache) and uploaded to the store under its
    spec hash, so every task of every node reads the same bytes from there; a later
    release finds it in the store and builds nothing."""
    if not model.source.startswith("tiny://"):
        return model.source
    from qatgguf.convert.source import is_checkpoint_file
    from qatgguf.fixtures import FAMILY, build_family, spec_hash

    name = model.source.removeprefix("tiny://")
    if name not in FAMILY:
        raise ConfigError(f"model {model.name}: tiny://{name} is not a built-in fixture; known: {sorted(FAMILY)}")
    prefix = cas_key("sources", spec_hash(FAMILY[name]), name)
    store = ctx.store()
    if store.stat(prefix + ".json") is None:
        path = build_family(cache_root() / "fixtures", models=[name])[name]
        files = {}
        for p in sorted(path.iterdir()):
            if p.is_file() and is_checkpoint_file(p.name):
                files[p.name] = store.put_file(p, f"{prefix}/{p.name}", exclusive=True).sha256
        # written last: the upload is complete when this exists
        store.put_json({"fixture": name, "files": files}, prefix + ".json", exclusive=True)
        log.info("tiny://%s built and stored at %s (%d files)", name, store.uri_for(prefix), len(files))
    return store.uri_for(prefix)


def source_snapshot(ctx: ReleaseContext, source_uri: str) -> SourceRef:
    """The source pinned to its current revision (no weights read)."""
    return snapshot(source_uri, options=ctx.source_options())


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanRef:
    recipe: str
    key: str
    ref: ArtifactRef


@dataclass(frozen=True)
class ShardInfo:
    index: int
    file: str | None
    size: int
    digest: str
    largest: int  # bytes of the largest source tensor (decides the row-block buffers)
    part_bytes: int  # bytes of the parts of every recipe


def _load_plan(store, ref: ArtifactRef):
    from qatgguf.convert import ConversionPlan

    return ConversionPlan.from_json(store.get_bytes(ref.uri).decode())


def _load_mmproj_plan(store, ref: ArtifactRef):
    from qatgguf.convert.mmproj import MmprojPlan

    return MmprojPlan.from_json(store.get_bytes(ref.uri).decode())


def _src_bytes(job) -> int:
    import math

    from qatgguf.convert.safetensors import DTYPES

    if job.src_dtype is None:
        return 0
    return math.prod(job.src_shape) * DTYPES[job.src_dtype][0]


# ---------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class PartRef:
    key: str
    ref: ArtifactRef


@dataclass(frozen=True)
class ShardResult:
    index: int
    parts: dict[str, PartRef]  # recipe -> part
    stats: StepStats = field(compare=False)


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
        loaded = {r: _load_plan(store, p.ref) for r, p in plan_refs.items()}
        keys = {r: part_key(plan, index) for r, plan in loaded.items()}
        for r, k in keys.items():
            ref = _reuse(store, cas_key("parts", k, "part"))
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


# ---------------------------------------------------------------------------- assemble


@dataclass(frozen=True)
class GGUFOutput:
    """A GGUF file (or its split files) in the store."""

    recipe: str
    key: str
    files: tuple[ArtifactRef, ...]
    eval_digest: str  # tensor bytes and the metadata that can change logits or tokens
    types: dict[str, int] = field(default_factory=dict)  # tensors per GGML type
    stats: StepStats = field(compare=False, default_factory=StepStats)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def sha256(self) -> str:
        return self.files[0].sha256


def _stored_output(store, key: str, kind: str, recipe: str) -> GGUFOutput | None:
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


@dataclass(frozen=True)
class ModelPlan:
    model: str
    source: SourceRef
    plan_refs: dict[str, PlanRef]  # recipe -> the stored plan (its key and store reference)
    shards: tuple[ShardInfo, ...]
    mmproj: PlanRef | None
    gguf_bytes: dict[str, int]  # recipe -> tensor bytes of its file
    n_vocab: int
    # outputs already in the store, found by their content keys: the flow does not submit
    # the tasks that would make them
    parts_done: dict[int, dict[str, PartRef]] = field(default_factory=dict)  # shards with every part
    gguf_done: dict[str, GGUFOutput] = field(default_factory=dict)
    mmproj_done: GGUFOutput | None = None
    eval_done: dict[str, dict] = field(default_factory=dict)  # recipe -> merged evaluation
    stats: StepStats = field(default_factory=StepStats, compare=False)

    @property
    def n_shards(self) -> int:
        return len(self.shards)


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
        found = {r: _reuse(store, cas_key("plans", k, "plan.json")) for r, k in keys.items()}
        mm_found = _reuse(store, cas_key("plans", mm_key, "mmproj-plan.json"))
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
        plans: dict[str, ConversionPlan] = {r: _load_plan(store, found[r]) for r in recipes}
        has_mm = store.get_bytes(mm_found.uri) != b"null"
        # what is already stored
        part_keys = {r: [part_key(p, i) for i in range(len(p.shards))] for r, p in plans.items()}
        parts_done: dict[int, dict[str, PartRef]] = {}
        any_plan = next(iter(plans.values()))
        for i in range(len(any_plan.shards)):
            refs = {r: _reuse(store, cas_key("parts", part_keys[r][i], "part")) for r in recipes}
            if all(refs.values()):
                parts_done[i] = {r: PartRef(part_keys[r][i], x) for r, x in refs.items()}
        gguf_done = {}
        for r, p in plans.items():
            key, _ = gguf_keys(p, part_keys[r], name=gguf_name(model, r), split=ctx.split_max_size)
            out = _stored_output(store, key, "gguf", r)
            if out is not None:
                gguf_done[r] = out
        mmproj_done = (_stored_output(store, content_key("mmproj", plan=mm_key, converter=CONVERTER_VERSION),
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


def split_limit(plan, max_file: int | None) -> int | None:
    """The tensor bytes per split file that keep every file within `max_file` bytes: the
    splitting rule counts tensor data only (as llama.cpp's --split-max-size does), and
    the first file also carries the whole metadata (the tokenizer is megabytes)."""
    if max_file is None:
        return None
    from qatgguf.gguf.writer import header_nbytes

    reserve = header_nbytes(plan.kvs, plan.tensor_infos())
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
        p = _load_plan(store, plan.ref)
        parts = [s.parts[recipe] for s in sorted(shards, key=lambda s: s.index)]
        name = gguf_name(model, recipe)
        key, eval_digest = gguf_keys(p, [pr.key for pr in parts], name=name, split=ctx.split_max_size)
        found = _stored_output(store, key, "gguf", recipe)
        if found is not None:
            stats.reused = True
            return replace(found, stats=stats)
        with scratch(f"{model.name}-{recipe}-asm-") as work:
            local = [_fetch(store, pr.ref, work / f"{i:05d}", stats) for i, pr in enumerate(parts)]
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
        p = _load_mmproj_plan(store, plan.ref)
        key = content_key("mmproj", plan=plan.key, converter=CONVERTER_VERSION)
        found = _stored_output(store, key, "mmproj", "mmproj")
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


# ---------------------------------------------------------------------------- evaluate


def runner_settings(settings: EvalConfig, *, gpu: bool = False):
    """The llama.cpp settings (`RunnerSettings`) of an evaluation under the release's
    `eval` config; `gpu`: offload every layer (the scheduler gave the task a GPU)."""
    from qatgguf.evaluate import RunnerSettings

    return RunnerSettings(n_batch=settings.batch, n_threads=settings.threads, n_gpu_layers=-1 if gpu else 0)


def eval_key(settings: EvalConfig) -> dict:
    """What of the `eval` config decides the numbers (threads, offload and how the chunks
    are cut into tasks do not): part of the evaluation content keys."""
    return {"ctx": settings.ctx, "chunks": settings.chunks, "logits": runner_settings(settings).logits_key()}


def _corpus_path(corpus: str | None) -> Path:
    from qatgguf.evaluate import default_corpus

    return Path(corpus) if corpus else default_corpus()


def _fetch_gguf(store, out: GGUFOutput, work: Path, stats: StepStats) -> Path:
    """Download a (possibly split) GGUF; returns the path llama.cpp opens (first split)."""
    return [_fetch(store, r, work, stats) for r in out.files][0]


@dataclass(frozen=True)
class BaseRecordsRef:
    key: str
    records: ArtifactRef
    n_chunks: int
    n_seq: int
    stats: StepStats = field(compare=False, default_factory=StepStats)


def _corpus_sha256(corpus: Path) -> str:
    from qatgguf.evaluate.records import file_digest

    return file_digest(corpus)


def base_records_key(base_eval_digest: str, settings: EvalConfig) -> str:
    from qatgguf.llamacpp import ggml_commit

    return content_key("base-records", base=base_eval_digest, corpus=_corpus_sha256(_corpus_path(settings.corpus)),
                       settings=eval_key(settings), llama_cpp=ggml_commit())


def eval_summary_key(quant_eval_digest: str, records_key: str, n_parts: int) -> str:
    """The key of a file's merged evaluation: its evaluation digest, the base records' key
    (base, corpus, settings, llama.cpp commit) and how the chunks were cut."""
    return content_key("eval-summary", quant=quant_eval_digest, base=records_key, n_parts=n_parts)


def base_records(ctx: ReleaseContext, base: GGUFOutput, settings: EvalConfig, *, gpu: bool = False
                 ) -> BaseRecordsRef:
    """The base model's log-prob records over the corpus, computed once per (base model,
    corpus, settings, llama.cpp commit): a record already in the store is reused, whatever
    release made it."""
    from qatgguf.evaluate import compute_base_records, count_chunks

    store = ctx.store()
    corpus = _corpus_path(settings.corpus)
    runner = runner_settings(settings, gpu=gpu)
    corpus_sha = _corpus_sha256(corpus)
    key = base_records_key(base.eval_digest, settings)
    with measure() as stats:
        index = store.stat(cas_key("eval", key, "records.json"))
        if index is not None:
            d = json.loads(store.get_bytes(index.uri))
            stats.reused = True
            return BaseRecordsRef(key, ArtifactRef.from_dict(d["records"]), d["n_chunks"], d["n_seq"], stats)
        with scratch("base-records-") as work:
            gguf = _fetch_gguf(store, base, work, stats)
            n_chunks = count_chunks(gguf, corpus, ctx=settings.ctx, chunks=settings.chunks)
            path = compute_base_records(gguf, corpus, ctx=settings.ctx, chunk_range=(0, n_chunks), settings=runner,
                                        out=work / "records.qgkl", base_sha256=base.eval_digest,
                                        corpus_sha256=corpus_sha)
            ref = store.put_file(path, cas_key("eval", key, "records.qgkl"), exclusive=True)
        n_seq = runner.n_seq(settings.ctx)
        store.put_json({"records": ref.to_dict(), "n_chunks": n_chunks, "n_seq": n_seq},
                       cas_key("eval", key, "records.json"), exclusive=True)
    return BaseRecordsRef(key, ref, n_chunks, n_seq, stats)


@dataclass(frozen=True)
class RangeOutput:
    key: str
    ref: ArtifactRef | None  # None: fewer ranges than parts
    stats: StepStats = field(compare=False, default_factory=StepStats)


def eval_range(ctx: ReleaseContext, *, model: str, recipe: str, quant: GGUFOutput, records: BaseRecordsRef,
               part: int, n_parts: int, settings: EvalConfig, gpu: bool = False) -> RangeOutput:
    """Evaluate range `part` of `n_parts` of the corpus chunks and store its per-token
    values under a key of (quant, base records, range, settings, llama.cpp commit)."""
    from qatgguf.evaluate import evaluate_chunks, plan_chunk_ranges
    from qatgguf.llamacpp import ggml_commit

    ranges = plan_chunk_ranges(records.n_chunks, n_parts=n_parts, n_seq=records.n_seq)
    if part >= len(ranges):
        return RangeOutput("", None)
    key = content_key("eval-range", quant=quant.eval_digest, base=records.key, range=list(ranges[part]),
                      settings=eval_key(settings), llama_cpp=ggml_commit())
    store = ctx.store()
    with measure() as stats:
        found = store.stat(cas_key("eval", key, "range.npz"))
        if found is not None:
            stats.reused = True
            return RangeOutput(key, found, stats)
        with scratch(f"{model}-{recipe}-eval{part}-") as work:
            rec = _fetch(store, records.records, work, stats)
            gguf = _fetch_gguf(store, quant, work, stats)
            values = evaluate_chunks(gguf, rec, chunk_range=ranges[part], quant_sha256=quant.sha256,
                                     n_threads=settings.threads, n_gpu_layers=-1 if gpu else 0)
            path = values.save(work / "range.npz")
            ref = store.put_file(path, cas_key("eval", key, "range.npz"), exclusive=True)
        log.info("%s %s range %d/%d: chunks %s", model, recipe, part + 1, len(ranges), ranges[part])
    return RangeOutput(key, ref, stats)


def merge_eval(ctx: ReleaseContext, *, model: str, recipe: str, ranges: Sequence[RangeOutput],
               quant: GGUFOutput, records: BaseRecordsRef, n_parts: int) -> dict:
    """Merge the chunk ranges exactly (per-token values are kept) into llama-perplexity's
    numbers, stored under the file's evaluation summary key (what a later release finds
    instead of evaluating again)."""
    from qatgguf.evaluate import RangeValues, merge

    store = ctx.store()
    done = [r for r in ranges if r.ref is not None]
    key = eval_summary_key(quant.eval_digest, records.key, n_parts)
    found = store.stat(cas_key("eval", key, "result.json"))
    if found is not None:
        return store.get_json(found.uri)
    stats = StepStats()
    with scratch(f"{model}-{recipe}-merge-") as work:
        values = [RangeValues.load(_fetch(store, r.ref, work / str(i), stats)) for i, r in enumerate(done)]
    data = {**merge(values).to_dict(), "key": key, "ranges": [r.key for r in done]}
    store.put_json(data, cas_key("eval", key, "result.json"), exclusive=True)
    return data


def gate(ctx: ReleaseContext, *, model: str, recipe: str, result: dict, quant: GGUFOutput,
         thresholds: GateConfig, naive_result: dict | None = None, naive: GGUFOutput | None = None) -> dict:
    """Apply the release gate and store the decision beside the numbers (and the size of
    the file they describe). With a naive baseline (`naive_result`, `naive`), the file
    must also have a lower mean KLD than it and be no larger."""
    from qatgguf.evaluate import EvalResult, apply_gate, beats_baseline

    result = {**result, "quant_size": quant.size, "quant_sha256": quant.sha256}
    numbers = {k: v for k, v in result.items() if k in EvalResult.__dataclass_fields__}
    decision = apply_gate(EvalResult(**numbers), thresholds)
    if naive_result is not None and naive is not None:
        base = {k: v for k, v in naive_result.items() if k in EvalResult.__dataclass_fields__}
        decision = beats_baseline(decision, EvalResult(**numbers), quant.size, EvalResult(**base), naive.size)
    data = {"model": model, "recipe": recipe, **decision.to_dict(), "thresholds": thresholds.model_dump(),
            "result": result}
    ctx.store().put_json(data, ctx.key(model, f"gate-{recipe}.json"))
    return data


# ---------------------------------------------------------------------------- publish


def publish_model(
    ctx: ReleaseContext,
    cfg: ReleaseConfig,
    model: ModelConfig,
    files: dict[str, GGUFOutput],
    gates: dict[str, dict],
    *,
    mmproj: GGUFOutput | None = None,
    base: GGUFOutput | None = None,
    variants: dict[str, dict] | None = None,
    tables: Sequence = (),
    token: str | None = None,
) -> dict:
    """Publish the files that passed the gate, with the mmproj, the model card (and its
    KLD plot) and the repo manifest, in one commit; then put the repo in the family's
    collection.

    `files` are the model's publishable files and `gates` the decisions of every recipe
    evaluated on it (the compare-only ones fill the card's naive-against-aligned table).
    `variants` maps each variant checkpoint (`E2B-mobile`) to {"files": its publishable
    files, "gates": its decisions}: they go into the same commit, and the card's mobile
    table. Never publishes a file whose gate decision is missing or failed; a recipe that
    failed keeps the file an earlier release published there. If none passed, nothing is
    published (no repo is created) and the result says why. `base` is the BF16 file (for
    the size table); `tables` extra `EvalTable`s for the card. The KLD plot reads the
    per-token values of the ranges each merged evaluation lists. Raises PublishError or
    ModelCardError."""
    from qatgguf.hub import (
        CardData,
        CardPlot,
        ReleaseFile,
        ReleaseUpload,
        RetryPolicy,
        content,
        open_publisher,
        read_model_facts,
        render_card,
    )

    variants = variants or {}
    candidates = [(r, files[r], gates.get(r, {})) for r in files]
    candidates += [(r, v["files"][r], v["gates"].get(r, {})) for v in variants.values() for r in v["files"]]
    passed = [(r, f) for r, f, g in candidates if g.get("passed")]
    failed = {r: g.get("reasons", ["no gate decision"]) for r, _, g in candidates if not g.get("passed")}
    store = ctx.store()
    data = {"model": model.name, "repo": model.repo, "published": False, "files": [], "failed": failed}
    if not passed:
        store.put_json(data, ctx.key(model.name, "published.json"))
        return data
    pub = cfg.publish
    naive = cfg.naive_recipe
    aligned = next((r for r in files if r != naive), None)
    labels = {r: quant_label(r) for r in {*gates, *(r for r, _, _ in candidates)}}
    primary = aligned if any(r == aligned for r, _ in passed) else passed[0][0]
    with scratch(f"{model.name}-publish-") as work:
        upload_files: list[ReleaseFile] = []
        stats = StepStats()
        for recipe, out in passed:
            for ref in out.files:
                upload_files.append(ReleaseFile(_fetch(store, ref, work, stats), recipe, "model", labels[recipe]))
        for ref in (mmproj.files if mmproj else ()):
            p = _fetch(store, ref, work, stats)
            upload_files.append(ReleaseFile(p, "mmproj", "mmproj", p.stem.split("-", 1)[-1]))
        primary_file = next(f for f in upload_files if f.recipe == primary)
        run = content.run_info(read_model_facts(primary_file.path), context=pub.card_context)
        card_tables = [content.comparison_table(model.name, gates, labels, aligned=aligned, naive=naive)]
        mobile = variant_table(model, variants, {f.path.name: f.path for f in upload_files})
        card_tables += [mobile] if mobile else []
        card_tables += list(tables)
        assets: list[tuple[str, bytes]] = []
        plot = None
        if aligned in gates and naive in gates:
            png = _kld_plot(store, model.name, work, (aligned, naive), labels, gates)
            assets.append((content.PLOT_PATH, png))
            plot = CardPlot(
                content.PLOT_PATH,
                alt=f"Per-token KLD of {labels[aligned]} and {labels[naive]} against BF16",
                caption=(
                    f"Distribution of the per-token KL divergence against BF16 of the aligned "
                    f"{labels[aligned]} and the naive {labels[naive]}, over the same scored tokens."
                ),
            )
        result = gates[primary]["result"]
        method = content.eval_method(
            result,
            corpus=Path(cfg.eval.corpus).name if cfg.eval.corpus else "default.txt",
            llama_cpp_commit=_llama_cpp_commit(),
            base_file=f"{model.file_prefix}-{quant_label(cfg.base_recipe)}.gguf",
            quant_file=primary_file.path.name,
            batch=cfg.eval.batch,
        )
        bf16_size = (base.size if base else 0) or result.get("base_size")
        publisher = open_publisher(
            pub, token=token, retry=RetryPolicy(max_attempts=pub.max_attempts, max_seconds=pub.max_seconds)
        )
        collection = None
        if pub.collection:
            collection = publisher.ensure_collection(pub.collection, namespace=model.repo.split("/", 1)[0])

        def card(manifest) -> str:
            return render_card(
                CardData(
                    repo_id=model.repo,
                    base_model=model.base_model or f"{cfg.family}/{model.name}",
                    license=cfg.license,
                    license_link=content.license_link(cfg.license, pub.license_link),
                    language=pub.languages,
                    quantized_by=cfg.quantized_by,
                    files=content.card_files(manifest, release_id=ctx.release_id, failed=failed),
                    tables=tuple(card_tables),
                    tags=("gemma4", "qat", "quantization-aware-training"),
                    primary_quant=labels[primary],
                    bf16_size=int(bf16_size) if bf16_size else None,
                    run=run,
                    method=method,
                    plot=plot,
                    collection_title=collection.title if collection else None,
                    collection_url=collection.url if collection else None,
                    release_id=ctx.release_id,
                )
            )

        upload = ReleaseUpload(ctx.release_id, tuple(upload_files), card, tuple(assets))
        result_pub = publisher.publish(
            model.repo, upload,
            commit_message=f"Release {ctx.release_id}: {', '.join(labels[r] for r, _ in passed)}",
        )
        if collection is not None:
            collection = publisher.add_to_collection(collection, model.repo)
    data.update(
        published=True, url=result_pub.url, commit=result_pub.commit, files=list(result_pub.files),
        committed=result_pub.committed, kept=list(result_pub.kept), deleted=list(result_pub.deleted),
        attempts=result_pub.attempts, retries=list(result_pub.retries),
        collection=collection.url if collection else None,
    )
    store.put_json(data, ctx.key(model.name, "published.json"))
    return data


def variant_table(model: ModelConfig, variants: dict[str, dict], local: dict[str, Path]):
    """The card's mobile table: per variant, its first publishable file that passed (size,
    TQ2_0 tensors) and that file's evaluation against the variant's own BF16; None when no
    variant file is published."""
    from qatgguf.evaluate.tables import MobileResult, mobile_table, tensor_types

    columns = {}
    for name, v in variants.items():
        ok = [(r, f) for r, f in v["files"].items() if v["gates"].get(r, {}).get("passed")]
        if not ok:
            continue
        recipe, out = ok[0]
        tq2 = out.types.get("TQ2_0")
        if tq2 is None:  # an output stored before its types were recorded: read the files
            tq2 = tensor_types([local[ref.uri.rsplit("/", 1)[-1]] for ref in out.files])["TQ2_0"]
        columns[name.replace(f"{model.name}-", f"{model.name} ", 1)] = MobileResult(
            out.size, tq2, v["gates"][recipe]["result"])
    if not columns:
        return None
    return mobile_table(columns, note="The mobile mixture checkpoints, evaluated against their own BF16: 2-bit "
                                      "(TQ2_0) layers where the export put them on the ternary grid.")


def _llama_cpp_commit() -> str:
    from qatgguf.llamacpp import ggml_commit

    return ggml_commit()


def _kld_plot(store, model: str, work: Path, recipes: tuple[str, str], labels: dict[str, str],
              gates: dict[str, dict]) -> bytes:
    """The per-token KLD plot of (aligned, naive) from the range results their merged
    evaluations list (by content key)."""
    import numpy as np

    from qatgguf.evaluate import RangeValues
    from qatgguf.hub.plot import plot_kld_distribution

    values = []
    for recipe in recipes:
        keys = gates[recipe]["result"].get("ranges") or []
        refs = [store.stat(cas_key("eval", k, "range.npz")) for k in keys]
        stats = [
            RangeValues.load(store.get_file(r.uri, work / f"{recipe}-range-{i}.npz", sha256=r.sha256))
            for i, r in enumerate(refs)
            if r is not None
        ]
        if not stats:
            from qatgguf.errors import PublishError

            raise PublishError(
                f"{model}/{recipe}: no per-token evaluation in the store for ranges {keys}; "
                "evaluate it before publishing"
            )
        stats.sort(key=lambda c: c.chunk_start)
        values.append(np.concatenate([c.values.kld for c in stats]))
    out = plot_kld_distribution(
        values[0], values[1], work / "kld-per-token.png",
        aligned_label=labels[recipes[0]], naive_label=labels[recipes[1]],
        title=f"{model}: per-token KLD against BF16",
    )
    return out.read_bytes()


# ---------------------------------------------------------------------------- releases


def model_fingerprint(cfg: ReleaseConfig, model: ModelConfig, source: SourceRef) -> str:
    """Everything that decides a model's published files and numbers: the source snapshot,
    the recipes (their files), the tool versions, the evaluation settings and the gate."""
    from qatgguf.keys import tool_versions

    recipes = (cfg.base_recipe, *cfg.recipes_for(model))
    return digest({"source": source.digest(), "recipes": {r: recipe_digest(r) for r in recipes},
                   "tools": tool_versions(), "eval": cfg.eval.model_dump(), "gate": cfg.gate_for(model).model_dump(),
                   "model": model.model_dump(), "split": cfg.publish.split_max_size,
                   "card": {"license": cfg.license, "quantized_by": cfg.quantized_by}})


def start_release(ctx: ReleaseContext, cfg: ReleaseConfig, *, resume: bool) -> dict:
    """Record (or, resuming, check) the release's config; returns the started record."""
    store = ctx.store()
    key = ctx.key("started.json")
    config = json.loads(cfg.model_dump_json())
    existing = store.stat(key)
    if resume:
        if existing is None:
            raise ConfigError(f"release {ctx.release_id} of {cfg.family} was never started in {ctx.store_url}; "
                              "drop --resume to start a new one")
        started = store.get_json(existing.uri)
        if started["config_digest"] != digest(config):
            raise ConfigError(f"release {ctx.release_id} was started with another config (digest "
                              f"{started['config_digest'][:12]}); resume it with the same config and selection")
        return started
    if existing is not None:
        raise ConfigError(f"release {ctx.release_id} already exists in {ctx.store_url}; use --resume to continue it")
    started = {"family": cfg.family, "release_id": ctx.release_id, "config": config, "config_digest": digest(config),
               "started": datetime.now(UTC).isoformat()}
    store.put_json(started, key, exclusive=True)
    return started


def latest_release(ctx: ReleaseContext) -> dict | None:
    """The record of the family's last release that published (`releases/<family>/latest.json`)."""
    store = ctx.store()
    ref = store.stat(f"releases/{ctx.family}/latest.json")
    return store.get_json(ref.uri) if ref is not None else None


def write_manifest(ctx: ReleaseContext, cfg: ReleaseConfig, models: dict[str, dict]) -> ArtifactRef:
    """The release's manifest: per model its status (published, or failed and why), source
    revision and digests, every content key and digest it used, each task's node, memory
    and seconds; the tool versions and recipe digests. When a model published, the
    family's `latest.json` points here."""
    from qatgguf.keys import tool_versions

    recipes = sorted({cfg.base_recipe, *(r for m in cfg.models for r in cfg.recipes_for(m))})
    data = {"family": cfg.family, "release_id": ctx.release_id, "finished": datetime.now(UTC).isoformat(),
            "tools": tool_versions(), "recipes": {r: recipe_digest(r) for r in recipes},
            "config": json.loads(cfg.model_dump_json()), "models": models}
    store = ctx.store()
    ref = store.put_json(data, ctx.key("manifest.json"))
    published = {m: d["fingerprint"] for m, d in models.items()
                 if d.get("status") == "published" and d.get("fingerprint")}
    if published:
        prev = latest_release(ctx) or {"models": {}}
        merged = {**prev.get("models", {}),
                  **{m: {"release_id": ctx.release_id, "fingerprint": fp, "manifest": ref.uri}
                     for m, fp in published.items()}}
        store.put_json({"release_id": ctx.release_id, "manifest": ref.uri, "models": merged},
                       f"releases/{ctx.family}/latest.json")
    return ref


def release_rows(summary: dict[str, dict]) -> list[dict]:
    """One row per evaluated file: what the release prints and its table artifact shows."""
    rows = []
    for name, s in summary.items():
        for r, g in (s.get("gates") or {}).items():
            res = g["result"]
            rows.append({
                "model": name,
                "method": quant_label(r),
                "size_MB": round(res.get("quant_size", 0) / 1e6, 3),
                "mean_KLD": round(res["mean_kld"], 6),
                "KLD_99.9%": round(res["kld_99_9"], 6),
                "top1_%": round(100 * res["same_top_p"], 2),
                "PPL": round(res["ppl_quant"], 4),
                "gate": "PASS" if g["passed"] else "FAIL: " + "; ".join(g["reasons"]),
            })
    return rows


def release_result(cfg: ReleaseConfig, *, release_id: str, manifest_uri: str, summary: dict[str, dict],
                   tables: list | None = None) -> dict:
    """What a release returns and `qatgguf release --json` prints: its id, manifest, rows
    (`release_rows`), models, tables as markdown (`release_tables`, unless given), the
    files whose gate failed and the models that failed."""
    tables = release_tables(cfg, summary) if tables is None else tables
    return {"release_id": release_id, "manifest": manifest_uri, "rows": release_rows(summary), "models": summary,
            "tables": [{"title": t.title, "markdown": t.markdown()} for t in tables],
            "gate_failed": [f"{m}/{r}" for m, s in summary.items() for r, g in s["gates"].items() if not g["passed"]],
            "failed": [f"{m}: {s['error']}" for m, s in summary.items() if s["status"] == "failed"]}


def format_release_rows(rows: list[dict]) -> str:
    """`release_rows` as the fixed-width text table the `qatgguf release` command prints
    (a header line, then one line per file)."""
    lines = [f"{'model':<10} {'method':<12} {'size MB':>9} {'mean KLD':>10} {'99.9% KLD':>10} {'top-1 %':>8} "
             f"{'PPL':>9}  gate"]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['method']:<12} {r['size_MB']:>9.3f} {r['mean_KLD']:>10.5f} "
                     f"{r['KLD_99.9%']:>10.4f} {r['top1_%']:>8.2f} {r['PPL']:>9.3f}  {r['gate']}")
    return "\n".join(lines) + "\n"


def release_report(*, family: str, release_id: str, summary: dict[str, dict], manifest_uri: str,
                   tables: list) -> str:
    """The release's markdown report (the flow's `<family>-release` artifact): the tables
    (`release_tables`), then each model's state, its gates and how many tasks reused
    finished outputs."""
    lines = [f"# Release {release_id} of {family}", "", f"Manifest: `{manifest_uri}`", ""]
    for table in tables:
        lines += [f"## {table.title}", "", table.note, "", table.markdown()]
    for name, s in summary.items():
        if s["status"] == "failed":
            state = f"**failed**: {s['error']}"
        elif s["status"] == "published":
            state = f"published to `{s['repo']}`"
        else:
            state = "**not published**"
        lines.append(f"## {name}: {state}")
        for r, g in s["gates"].items():
            verdict = "PASS" if g["passed"] else "FAIL — " + "; ".join(g["reasons"])
            lines.append(f"- {quant_label(r)}: {verdict}")
        done = [x for x in s["tasks"] if x.get("seconds") is not None]
        reused = sum(1 for x in done if x.get("reused"))
        lines.append(f"- tasks: {len(s['tasks'])}, of which {reused} reused finished outputs")
        lines.append("")
    return "\n".join(lines)


def release_tables(cfg: ReleaseConfig, summary: dict[str, dict]) -> list:
    """The release's two seed-shaped tables (`EvalTable`s): naive against aligned for
    every model (the aligned file, then the naive baseline), and the mobile mixtures
    (each variant's published file against its own BF16)."""
    from qatgguf.evaluate.tables import MethodResult, MobileResult, comparison_rows, comparison_table, mobile_table

    naive = cfg.naive_recipe
    rows: list[dict[str, str]] = []
    columns: dict[str, MobileResult] = {}
    for m in cfg.models:
        for ck in cfg.checkpoints(m):
            s = summary.get(ck.name) or {}
            gates = s.get("gates") or {}
            publish = [r for r in cfg.publish_for(ck) if r in gates and r != naive]
            if ck.name == m.name:
                order = publish[:1] + ([naive] if naive in gates else [])
                rows += comparison_rows(m.name, [
                    MethodResult(quant_label(r), int(gates[r]["result"]["quant_size"]), gates[r]["result"],
                                 passed=bool(gates[r]["passed"])) for r in order])
            elif publish:
                r = publish[0]
                out = ((s.get("outputs") or {}).get("files") or {}).get(r) or {}
                columns[ck.name.replace("-", " ", 1)] = MobileResult(
                    int(gates[r]["result"]["quant_size"]), int((out.get("types") or {}).get("TQ2_0", 0)),
                    gates[r]["result"])
    tables = []
    if rows:
        tables.append(comparison_table(rows, note=f"Mean and 99.9% KLD and top-1 agreement against each model's "
                                                  f"BF16; {quant_label(naive) if naive else ''} is the naive "
                                                  "conversion (llama-quantize's choices)."))
    if columns:
        tables.append(mobile_table(columns))
    return tables
