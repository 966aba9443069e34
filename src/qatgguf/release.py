"""The steps of a release, as plain functions over store URIs and digests.

Each function here is the body of one Prefect task (tasks/): it reads its inputs from the
artifact store, does one piece of work in a private scratch directory, writes its outputs
back to the store and returns small values (ArtifactRef, dicts of numbers). Nothing here
knows about Prefect or Ray, so every step can be run and tested on its own.

Store layout, below the store's root::

    releases/<family>/<release_id>/<model>/<recipe>/plan.json
    releases/<family>/<release_id>/<model>/<recipe>/parts/shard-00001.part
    releases/<family>/<release_id>/<model>/<recipe>/<file_prefix>-<QUANT>.gguf (or split files)
    releases/<family>/<release_id>/<model>/eval/<recipe>/range-<i>.json, result.json, gate.json
    releases/<family>/<release_id>/<model>/published.json
    releases/<family>/<release_id>/manifest.json
    eval-base/<base sha256>/<corpus sha256>/<settings digest>/records.bin   (shared across releases)
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
from dataclasses import asdict, dataclass
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
    """A local checkpoint directory for a model source."""
    if source.startswith("tiny://"):
        from qatgguf.fixtures import build_family

        name = source.removeprefix("tiny://")
        return build_family(cache_root() / "fixtures", models=[name])[name]
    if source.startswith("hf://"):
        from qatgguf.convert.sources import fetch_hf_checkpoint

        return fetch_hf_checkpoint(source, cache_dir=cache_root() / "hf")
    if source.startswith("s3://"):
        from qatgguf.convert.sources import fetch_store_checkpoint

        return fetch_store_checkpoint(source, cache_dir=cache_root() / "s3")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model source {source!r} is not a directory")
    return path.resolve()


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ModelPlan:
    model: str
    source_dir: str
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
        has_mmproj = has_mmproj or bool(getattr(plan, "mmproj_tensors", ()))
        ref = store.put_json(ctx.key(model.name, recipe, "plan.json"), json.loads(plan.to_json()))
        uris[recipe] = ref.uri
    return ModelPlan(model.name, str(src), int(n_shards or 0), uris, has_mmproj)


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


# ---------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class EvalSettings:
    corpus: str | None
    ctx: int
    chunks: int | None
    threads: int = 1


def _corpus_path(corpus: str | None) -> Path:
    from qatgguf.evaluate.corpus import default_corpus_path

    return Path(corpus) if corpus else default_corpus_path()


def _fetch_gguf(store, refs: Sequence[ArtifactRef], work: Path) -> Path:
    """Download a (possibly split) GGUF; returns the path llama.cpp opens (first split)."""
    paths = [store.get_file(r.uri, work / r.uri.rsplit("/", 1)[-1], sha256=r.sha256) for r in refs]
    return paths[0]


def base_records(ctx: ReleaseContext, base: Sequence[ArtifactRef], settings: EvalSettings) -> ArtifactRef:
    """The base model's log-prob records, computed once per (base file, corpus, settings):
    a record already in the store is reused, whatever release made it."""
    from qatgguf.evaluate import compute_base_records

    store = ctx.store()
    corpus = _corpus_path(settings.corpus)
    corpus_sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    settings_digest = hashlib.sha256(
        json.dumps({"ctx": settings.ctx, "chunks": settings.chunks}, sort_keys=True).encode()
    ).hexdigest()[:16]
    key = f"eval-base/{base[0].sha256}/{corpus_sha}/{settings_digest}/records.bin"
    existing = store.stat(key)
    if existing is not None:
        log.info("reusing base records %s", existing.uri)
        return existing
    with scratch("base-records-") as work:
        gguf = _fetch_gguf(store, base, work)
        path = compute_base_records(
            gguf, corpus, ctx=settings.ctx, chunks=settings.chunks, threads=settings.threads, out=work / "records.bin"
        )
        return store.put_file(path, key)


def eval_range(
    ctx: ReleaseContext,
    model: str,
    recipe: str,
    quant: Sequence[ArtifactRef],
    records: ArtifactRef,
    part: int,
    n_parts: int,
    settings: EvalSettings,
) -> ArtifactRef:
    """Evaluate one range of chunks (part `part` of `n_parts`) of a quant against the base records."""
    from qatgguf.evaluate import chunk_ranges, evaluate_chunks, read_records_header

    store = ctx.store()
    with scratch(f"{model}-{recipe}-eval{part}-") as work:
        rec = store.get_file(records.uri, work / "records.bin", sha256=records.sha256)
        n_chunks = read_records_header(rec).n_chunks
        rng = chunk_ranges(n_chunks, n_parts)[part]
        gguf = _fetch_gguf(store, quant, work)
        stats = evaluate_chunks(gguf, rec, chunk_range=rng, threads=settings.threads)
        return store.put_json(ctx.key(model, "eval", recipe, f"range-{part}.json"), stats.to_dict())


def merge_eval(
    ctx: ReleaseContext, model: str, recipe: str, ranges: Sequence[ArtifactRef], quant: Sequence[ArtifactRef]
) -> dict:
    """Merge the chunk ranges exactly (per-token values are kept) into llama-perplexity's numbers."""
    from qatgguf.evaluate import ChunkStats, merge

    store = ctx.store()
    result = merge([ChunkStats.from_dict(store.get_json(r.uri)) for r in ranges])
    data = result.to_dict()
    data["quant_size"] = sum(r.size for r in quant)
    data["quant_files"] = [r.uri for r in quant]
    store.put_json(ctx.key(model, "eval", recipe, "result.json"), data)
    return data


def gate(ctx: ReleaseContext, model: str, recipe: str, result: dict, thresholds: GateConfig) -> dict:
    """Apply the release gate and store the decision beside the numbers."""
    from qatgguf.evaluate.gate import GateThresholds, apply_gate

    decision = apply_gate(result, GateThresholds(**thresholds.model_dump()))
    data = {"model": model, "recipe": recipe, "passed": decision.passed, "reasons": list(decision.reasons),
            "thresholds": thresholds.model_dump(), "result": result}
    ctx.store().put_json(ctx.key(model, "eval", recipe, "gate.json"), data)
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
    from qatgguf.hub import CardData, EvalRow, FileEntry, open_publisher, render_card

    passed = [r for r, g in gates.items() if g.get("passed")]
    failed = {r: g.get("reasons", ["no gate decision"]) for r, g in gates.items() if not g.get("passed")}
    store = ctx.store()
    if not passed:
        data = {"model": model.name, "repo": model.repo, "published": False, "files": [], "failed": failed}
        store.put_json(ctx.key(model.name, "published.json"), data)
        return data
    with scratch(f"{model.name}-publish-") as work:
        local: list[Path] = []
        entries: list[FileEntry] = []
        for recipe in passed:
            for ref in files[recipe]:
                p = store.get_file(ref.uri, work / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
                local.append(p)
                entries.append(FileEntry(path=p.name, quant=quant_label(recipe), size=ref.size, sha256=ref.sha256))
        for ref in mmproj:
            p = store.get_file(ref.uri, work / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
            local.append(p)
            entries.append(FileEntry(path=p.name, quant="mmproj", size=ref.size, sha256=ref.sha256))
        rows = [
            EvalRow(
                model=model.name,
                method=quant_label(r),
                size_bytes=int(gates[r]["result"].get("quant_size", 0)),
                mean_kld=float(gates[r]["result"]["mean_kld"]),
                kld_99_9=float(gates[r]["result"]["kld_99_9"]),
                top1=float(gates[r]["result"]["same_top_p"]),
                ppl=float(gates[r]["result"]["ppl_quant"]),
                passed=bool(gates[r]["passed"]),
            )
            for r in gates
        ]
        card = render_card(
            CardData(
                repo_id=model.repo,
                base_model=model.base_model or f"{cfg.family}/{model.name}",
                license=cfg.license,
                quantized_by=cfg.quantized_by,
                files=tuple(entries),
                eval_rows=tuple(rows),
                release_id=ctx.release_id,
            )
        )
        publisher = open_publisher(cfg.publish)
        result = publisher.publish(
            model.repo, local, card, commit_message=f"Release {ctx.release_id}: {', '.join(quant_label(r) for r in passed)}"
        )
    data = {"model": model.name, "repo": model.repo, "published": True, "url": result.url,
            "commit": result.commit, "files": [e.path for e in entries], "failed": failed}
    store.put_json(ctx.key(model.name, "published.json"), data)
    return data


def write_manifest(ctx: ReleaseContext, cfg: ReleaseConfig, summary: dict) -> ArtifactRef:
    data = {"family": cfg.family, "release_id": ctx.release_id, "config": json.loads(cfg.model_dump_json()),
            "models": summary}
    return ctx.store().put_json(ctx.key("manifest.json"), data)


def ref_dict(ref: ArtifactRef) -> dict:
    return asdict(ref)
