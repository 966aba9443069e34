"""The steps of a release, as plain functions over store URIs and digests.

Each function here is the body of one Prefect task (tasks/): it reads its inputs from the
artifact store, does one piece of work in a private scratch directory, writes its outputs
back to the store and returns small values (ArtifactRef, dicts of numbers). Nothing here
knows about Prefect or Ray, so every step can be run and tested on its own.

Store layout, below the store's root::

    releases/<family>/<release_id>/<model>/<recipe>/plan.json
    releases/<family>/<release_id>/<model>/<recipe>/parts/shard-00001.part
    releases/<family>/<release_id>/<model>/<recipe>/<file_prefix>-<QUANT>.gguf (or split files)
    releases/<family>/<release_id>/<model>/mmproj/mmproj-BF16.gguf
    releases/<family>/<release_id>/<model>/eval/<recipe>/range-<i>.npz, result.json, gate.json
    releases/<family>/<release_id>/<model>/published.json
    releases/<family>/<release_id>/manifest.json
    eval-base/<base sha256>/<corpus sha256[:16]>/c<ctx>-<settings>/chunks-<a>-<b>.qgkl
        (base records, shared by every quant and release of the same base file)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qatgguf.config import GateConfig, ModelConfig, ReleaseConfig
from qatgguf.errors import ConfigError
from qatgguf.store import ArtifactRef, open_store

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("QATGGUF_CACHE", Path.home() / ".cache" / "qatgguf"))


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A private working directory, removed afterwards whatever happens."""
    root = cache_root() / "work"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def new_release_id(cfg: ReleaseConfig) -> str:
    digest = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:8]
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{digest}"


def quant_label(recipe: str) -> str:
    """The file-name suffix of a recipe: q4_0 -> Q4_0, UD-Q4_K_XL stays, bf16 -> BF16."""
    return recipe.upper() if not recipe.upper().startswith("UD-") else recipe


@dataclass(frozen=True)
class ReleaseContext:
    """What every step needs to find its inputs and outputs; small and picklable."""

    family: str
    release_id: str
    store_url: str
    store_endpoint: str | None = None

    def store(self):
        return open_store(self.store_url, endpoint_url=self.store_endpoint)

    def key(self, *parts: str) -> str:
        return "/".join(("releases", self.family, self.release_id, *parts))


# ---------------------------------------------------------------------------- sources


def resolve_source(source: str) -> Path:
    """A local checkpoint directory for a model source: `tiny://NAME` builds (or reuses) the
    built-in tiny family; paths, `hf://` and `s3://` go through the converter's resolver."""
    if source.startswith("tiny://"):
        from qatgguf.fixtures import build_family

        name = source.removeprefix("tiny://")
        return build_family(cache_root() / "fixtures", models=[name])[name]
    from qatgguf.convert.source import resolve_source as resolve

    return resolve(source, cache_dir=cache_root() / "sources")


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ModelPlan:
    model: str
    n_shards: int
    plans: dict[str, str]  # recipe -> plan.json URI
    has_mmproj: bool


def plan_model(ctx: ReleaseContext, model: ModelConfig, recipes: Sequence[str]) -> ModelPlan:
    """Plan every recipe of one model and validate the checkpoint before any heavy work."""
    from qatgguf.convert import plan_conversion

    src = resolve_source(model.source)
    store = ctx.store()
    uris: dict[str, str] = {}
    n_shards = None
    has_mmproj = False
    for recipe in recipes:
        plan = plan_conversion(src, recipe=recipe)
        n_shards = len(plan.shards)
        has_mmproj = has_mmproj or bool(plan.mmproj)
        ref = store.put_json(json.loads(plan.to_json()), ctx.key(model.name, recipe, "plan.json"))
        uris[recipe] = ref.uri
    return ModelPlan(model.name, int(n_shards or 0), uris, has_mmproj)


def _load_plan(store, uri: str):
    from qatgguf.convert import ConversionPlan

    return ConversionPlan.from_json(json.dumps(store.get_json(uri)))


# ---------------------------------------------------------------------------- shards


def run_shard(ctx: ReleaseContext, model: str, plans: dict[str, str], index: int) -> dict[str, ArtifactRef]:
    """Convert one safetensors shard for every recipe: the shard is read once per recipe,
    never another shard. Returns {recipe: part ref}."""
    from qatgguf.convert import convert_shard

    store = ctx.store()
    out: dict[str, ArtifactRef] = {}
    with scratch(f"{model}-shard{index}-") as work:
        for recipe, plan_uri in plans.items():
            plan = _load_plan(store, plan_uri)
            part = work / f"{recipe}-shard-{index + 1:05d}.part"
            convert_shard(plan, index, part)
            out[recipe] = store.put_file(part, ctx.key(model, recipe, "parts", part.name.split("-", 1)[1]))
            part.unlink()
    return out


# ---------------------------------------------------------------------------- assemble


def assemble_model(
    ctx: ReleaseContext,
    model: ModelConfig,
    recipe: str,
    plan_uri: str,
    parts: Sequence[dict[str, ArtifactRef]],
    *,
    split_max_size: int | None = None,
) -> list[ArtifactRef]:
    """Write the GGUF (or its split files) for one recipe from the shard parts, streaming."""
    from qatgguf.convert import assemble

    store = ctx.store()
    plan = _load_plan(store, plan_uri)
    with scratch(f"{model.name}-{recipe}-asm-") as work:
        local_parts = []
        for i, by_recipe in enumerate(parts):
            ref = by_recipe[recipe]
            local_parts.append(store.get_file(ref.uri, work / f"shard-{i + 1:05d}.part", sha256=ref.sha256))
        name = f"{model.file_prefix}-{quant_label(recipe)}.gguf"
        files = assemble(plan, local_parts, work / name, split_max_size=split_max_size)
        return [store.put_file(f, ctx.key(model.name, recipe, f.name)) for f in files]


def mmproj_model(ctx: ReleaseContext, model: ModelConfig, *, outtype: str = "bf16") -> list[ArtifactRef]:
    """Write the vision (and audio) projector `mmproj-<TYPE>.gguf` as llama.cpp keeps it
    (F16/BF16, never quantized); [] for a checkpoint without towers."""
    from qatgguf.convert.mmproj import mmproj_filename, plan_mmproj, write_mmproj_plan

    plan = plan_mmproj(resolve_source(model.source), outtype=outtype)
    if plan is None:
        return []
    with scratch(f"{model.name}-mmproj-") as work:
        path = write_mmproj_plan(plan, work / mmproj_filename(outtype))
        return [ctx.store().put_file(path, ctx.key(model.name, "mmproj", path.name))]


# ---------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class EvalSettings:
    corpus: str | None
    ctx: int
    chunks: int | None
    threads: int = 1
    batch: int = 2048

    def runner(self):
        from qatgguf.evaluate import RunnerSettings

        return RunnerSettings(n_batch=self.batch, n_threads=self.threads)


def _corpus_path(corpus: str | None) -> Path:
    from qatgguf.evaluate import default_corpus

    return Path(corpus) if corpus else default_corpus()


def _fetch_gguf(store, refs: Sequence[ArtifactRef], work: Path) -> Path:
    """Download a (possibly split) GGUF; returns the path llama.cpp opens (first split)."""
    paths = [store.get_file(r.uri, work / r.uri.rsplit("/", 1)[-1], sha256=r.sha256) for r in refs]
    return paths[0]


@dataclass(frozen=True)
class BaseRecordsRef:
    records: ArtifactRef
    n_chunks: int
    n_seq: int


def base_records(ctx: ReleaseContext, base: Sequence[ArtifactRef], settings: EvalSettings) -> BaseRecordsRef:
    """The base model's log-prob records, computed once per (base file, corpus, context,
    llama.cpp settings): a record already in the store is reused, whatever release made it."""
    from qatgguf.evaluate import compute_base_records, count_chunks, record_key
    from qatgguf.evaluate.records import sha256_file

    store = ctx.store()
    corpus = _corpus_path(settings.corpus)
    runner = settings.runner()
    with scratch("base-records-") as work:
        gguf = _fetch_gguf(store, base, work)
        n_chunks = count_chunks(gguf, corpus, ctx=settings.ctx, chunks=settings.chunks)
        key = record_key(gguf, corpus, ctx=settings.ctx, chunk_range=(0, n_chunks), settings=runner,
                         base_sha256=base[0].sha256, corpus_sha256=sha256_file(corpus))
        existing = store.stat(key.store_key())
        if existing is not None:
            log.info("reusing base records %s", existing.uri)
            ref = existing
        else:
            path = compute_base_records(gguf, corpus, ctx=settings.ctx, chunk_range=(0, n_chunks), settings=runner,
                                        out=work / "records.qgkl", base_sha256=base[0].sha256,
                                        corpus_sha256=key.corpus_sha256)
            ref = store.put_file(path, key.store_key())
    return BaseRecordsRef(ref, n_chunks, runner.n_seq(settings.ctx))


def eval_range(
    ctx: ReleaseContext,
    model: str,
    recipe: str,
    quant: Sequence[ArtifactRef],
    records: BaseRecordsRef,
    part: int,
    n_parts: int,
    settings: EvalSettings,
) -> ArtifactRef | None:
    """Evaluate range `part` of `n_parts` of the corpus chunks (None when there are fewer
    ranges than parts) and store its per-token values."""
    from qatgguf.evaluate import evaluate_chunks, plan_chunk_ranges

    ranges = plan_chunk_ranges(records.n_chunks, n_parts=n_parts, n_seq=records.n_seq)
    if part >= len(ranges):
        return None
    store = ctx.store()
    with scratch(f"{model}-{recipe}-eval{part}-") as work:
        rec = store.get_file(records.records.uri, work / "records.qgkl", sha256=records.records.sha256)
        gguf = _fetch_gguf(store, quant, work)
        stats = evaluate_chunks(gguf, rec, chunk_range=ranges[part], quant_sha256=quant[0].sha256,
                                n_threads=settings.threads)
        path = stats.save(work / f"range-{part}.npz")
        return store.put_file(path, ctx.key(model, "eval", recipe, path.name))


def merge_eval(
    ctx: ReleaseContext, model: str, recipe: str, ranges: Sequence[ArtifactRef | None], quant: Sequence[ArtifactRef]
) -> dict:
    """Merge the chunk ranges exactly (per-token values are kept) into llama-perplexity's numbers."""
    from qatgguf.evaluate import ChunkStats, merge

    store = ctx.store()
    with scratch(f"{model}-{recipe}-merge-") as work:
        stats = [
            ChunkStats.load(store.get_file(r.uri, work / f"range-{i}.npz", sha256=r.sha256))
            for i, r in enumerate(ranges)
            if r is not None
        ]
    data = merge(stats).to_dict()
    data["quant_size"] = sum(r.size for r in quant)  # all split files
    store.put_json(data, ctx.key(model, "eval", recipe, "result.json"))
    return data


def gate(ctx: ReleaseContext, model: str, recipe: str, result: dict, thresholds: GateConfig) -> dict:
    """Apply the release gate and store the decision beside the numbers."""
    from qatgguf.evaluate import EvalResult, GateThresholds, apply_gate

    decision = apply_gate(EvalResult(**result), GateThresholds(**thresholds.model_dump()))
    data = {"model": model, "recipe": recipe, **decision.to_dict(), "thresholds": thresholds.model_dump(),
            "result": result}
    ctx.store().put_json(data, ctx.key(model, "eval", recipe, "gate.json"))
    return data


# ---------------------------------------------------------------------------- publish


def publish_model(
    ctx: ReleaseContext,
    cfg: ReleaseConfig,
    model: ModelConfig,
    files: dict[str, Sequence[ArtifactRef]],
    gates: dict[str, dict],
    *,
    mmproj: Sequence[ArtifactRef] = (),
) -> dict:
    """Publish the files that passed the gate, with the mmproj and a model card.

    Never publishes a file whose gate decision is missing or failed; if none passed,
    nothing is published and the result says why."""
    from qatgguf.hub import CardData, CardFile, EvalRow, open_publisher, render_card

    passed = [r for r, g in gates.items() if g.get("passed")]
    failed = {r: g.get("reasons", ["no gate decision"]) for r, g in gates.items() if not g.get("passed")}
    store = ctx.store()
    data = {"model": model.name, "repo": model.repo, "published": False, "files": [], "failed": failed}
    if not passed:
        store.put_json(data, ctx.key(model.name, "published.json"))
        return data
    with scratch(f"{model.name}-publish-") as work:
        local: list[Path] = []
        entries: list[CardFile] = []
        for recipe in passed:
            for ref in files[recipe]:
                p = store.get_file(ref.uri, work / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
                local.append(p)
                entries.append(CardFile(path=p.name, size=ref.size, quant=quant_label(recipe)))
        for ref in mmproj:
            p = store.get_file(ref.uri, work / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
            local.append(p)
            entries.append(CardFile(path=p.name, size=ref.size, kind="mmproj"))
        rows = tuple(
            EvalRow(
                model=model.name,
                method=quant_label(r),
                size=int(g["result"]["quant_size"]),
                mean_kld=float(g["result"]["mean_kld"]),
                kld_p999=float(g["result"]["kld_99_9"]),
                top1_pct=100.0 * float(g["result"]["same_top_p"]),
                ppl=float(g["result"]["ppl_quant"]),
                passed=bool(g["passed"]),
            )
            for r, g in gates.items()
        )
        card = render_card(
            CardData(
                repo_id=model.repo,
                base_model=model.base_model or f"{cfg.family}/{model.name}",
                license=cfg.license,
                quantized_by=cfg.quantized_by,
                files=tuple(entries),
                eval_rows=rows,
            )
        )
        result = open_publisher(cfg.publish).publish(
            model.repo, local, card,
            commit_message=f"Release {ctx.release_id}: {', '.join(quant_label(r) for r in passed)}",
        )
    data.update(published=True, url=result.url, commit=result.commit, files=list(result.files))
    store.put_json(data, ctx.key(model.name, "published.json"))
    return data


def write_manifest(ctx: ReleaseContext, cfg: ReleaseConfig, summary: dict) -> ArtifactRef:
    data = {"family": cfg.family, "release_id": ctx.release_id, "config": json.loads(cfg.model_dump_json()),
            "models": summary}
    return ctx.store().put_json(data, ctx.key("manifest.json"))

