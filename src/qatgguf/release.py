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
    base: Sequence[ArtifactRef] = (),
    eval_ranges: dict[str, Sequence[ArtifactRef | None]] | None = None,
    tables: Sequence = (),
    token: str | None = None,
) -> dict:
    """Publish the files that passed the gate, with the mmproj, the model card (and its
    KLD plot) and the repo manifest, in one commit; then put the repo in the family's
    collection.

    Never publishes a file whose gate decision is missing or failed; a recipe that failed
    keeps the file an earlier release published there. If none passed, nothing is
    published (no repo is created) and the result says why. `base` are the BF16 files
    (for the size table; else the evaluation's recorded base size); `eval_ranges` the
    per-recipe range results of `eval_range` (else found in the store at their keys);
    `tables` extra `EvalTable`s for the card (the mobile table). Raises PublishError or
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

    passed = [r for r, g in gates.items() if g.get("passed")]
    failed = {r: g.get("reasons", ["no gate decision"]) for r, g in gates.items() if not g.get("passed")}
    store = ctx.store()
    data = {"model": model.name, "repo": model.repo, "published": False, "files": [], "failed": failed}
    if not passed:
        store.put_json(data, ctx.key(model.name, "published.json"))
        return data
    pub = cfg.publish
    aligned, naive = pub.aligned_recipe, pub.naive_recipe
    labels = {r: quant_label(r) for r in gates}
    primary = aligned if aligned in passed else passed[0]
    with scratch(f"{model.name}-publish-") as work:
        upload_files: list[ReleaseFile] = []
        for recipe in passed:
            for ref in files[recipe]:
                p = store.get_file(ref.uri, work / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
                upload_files.append(ReleaseFile(p, recipe, "model", labels[recipe]))
        for ref in mmproj:
            p = store.get_file(ref.uri, work / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)
            upload_files.append(ReleaseFile(p, "mmproj", "mmproj", p.stem.split("-", 1)[-1]))
        primary_file = next(f for f in upload_files if f.recipe == primary)
        run = content.run_info(read_model_facts(primary_file.path), context=pub.card_context)
        card_tables = [content.comparison_table(model.name, gates, labels, aligned=aligned, naive=naive)]
        card_tables += list(tables)
        assets: list[tuple[str, bytes]] = []
        plot = None
        if aligned in gates and naive in gates:
            png = _kld_plot(ctx, store, model.name, work, (aligned, naive), labels, eval_ranges)
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
        bf16_size = sum(r.size for r in base) or result.get("base_size")
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
            commit_message=f"Release {ctx.release_id}: {', '.join(labels[r] for r in passed)}",
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


def _llama_cpp_commit() -> str:
    from qatgguf.llamacpp import ggml_commit

    return ggml_commit()


def _kld_plot(ctx: ReleaseContext, store, model: str, work: Path, recipes: tuple[str, str],
              labels: dict[str, str], eval_ranges: dict[str, Sequence[ArtifactRef | None]] | None) -> bytes:
    """The per-token KLD plot of (aligned, naive) from their stored range results."""
    import numpy as np

    from qatgguf.evaluate import ChunkStats
    from qatgguf.hub.plot import plot_kld_distribution

    values = []
    for recipe in recipes:
        refs = list((eval_ranges or {}).get(recipe) or ())
        if not refs:
            # eval_range's keys: range-0.npz, range-1.npz, ... until one is missing
            i = 0
            while (ref := store.stat(ctx.key(model, "eval", recipe, f"range-{i}.npz"))) is not None:
                refs.append(ref)
                i += 1
        stats = [
            ChunkStats.load(store.get_file(r.uri, work / f"{recipe}-range-{i}.npz", sha256=r.sha256))
            for i, r in enumerate(refs)
            if r is not None
        ]
        if not stats:
            from qatgguf.errors import PublishError

            raise PublishError(
                f"{model}/{recipe}: no per-token evaluation in the store under "
                f"{ctx.key(model, 'eval', recipe)}; evaluate it before publishing"
            )
        stats.sort(key=lambda c: c.chunk_start)
        values.append(np.concatenate([c.values.kld for c in stats]))
    out = plot_kld_distribution(
        values[0], values[1], work / "kld-per-token.png",
        aligned_label=labels[recipes[0]], naive_label=labels[recipes[1]],
        title=f"{model}: per-token KLD against BF16",
    )
    return out.read_bytes()


def write_manifest(ctx: ReleaseContext, cfg: ReleaseConfig, summary: dict) -> ArtifactRef:
    data = {"family": cfg.family, "release_id": ctx.release_id, "config": json.loads(cfg.model_dump_json()),
            "models": summary}
    return ctx.store().put_json(data, ctx.key("manifest.json"))

