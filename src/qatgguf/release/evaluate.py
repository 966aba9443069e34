"""Release steps: the base model's records, evaluation of chunk ranges, and their merge."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from qatgguf.config import EvalConfig
from qatgguf.keys import (
    cas_key,
    content_key,
)
from qatgguf.release.context import ReleaseContext, fetch_gguf, fetch_object, scratch
from qatgguf.release.refs import BaseRecordsRef, GGUFOutput, RangeOutput
from qatgguf.resources import StepStats, measure
from qatgguf.store import ArtifactRef

log = logging.getLogger(__name__)


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


def _corpus_sha256(corpus: Path) -> str:
    from qatgguf.evaluate.base import file_digest

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
            gguf = fetch_gguf(store, base, work, stats)
            n_chunks = count_chunks(gguf, corpus, ctx=settings.ctx, chunks=settings.chunks)
            path = compute_base_records(gguf, corpus, ctx=settings.ctx, chunk_range=(0, n_chunks), settings=runner,
                                        out=work / "records.qgkl", base_sha256=base.eval_digest,
                                        corpus_sha256=corpus_sha)
            ref = store.put_file(path, cas_key("eval", key, "records.qgkl"), exclusive=True)
        n_seq = runner.n_seq(settings.ctx)
        store.put_json({"records": ref.to_dict(), "n_chunks": n_chunks, "n_seq": n_seq},
                       cas_key("eval", key, "records.json"), exclusive=True)
    return BaseRecordsRef(key, ref, n_chunks, n_seq, stats)


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
            rec = fetch_object(store, records.records, work, stats)
            gguf = fetch_gguf(store, quant, work, stats)
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
        values = [RangeValues.load(fetch_object(store, r.ref, work / str(i), stats)) for i, r in enumerate(done)]
    data = {**merge(values).to_dict(), "key": key, "ranges": [r.key for r in done]}
    store.put_json(data, cas_key("eval", key, "result.json"), exclusive=True)
    return data
