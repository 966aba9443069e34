"""The base-record pipeline: run the base GGUF over the corpus and write its records
(`records.BaseRecords` reads them)."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qatgguf.errors import EvaluationError
from qatgguf.evaluate.chunks import check_corpus_len, resolve_range
from qatgguf.evaluate.records import ROW_BLOCK, BaseRecords, RecordKey, RecordWriter, key_dict
from qatgguf.evaluate.rowwork import RowWork, default_threads
from qatgguf.evaluate.runner import LogitsRunner, RunnerSettings, read_corpus_text
from qatgguf.files import sha256_file


def file_digest(path: Path) -> str:
    """The sha256 of an input file; raises EvaluationError naming it when it is unreadable."""
    try:
        return sha256_file(path)[0]
    except OSError as exc:
        raise EvaluationError(
            f"{path}: file not found or unreadable ({exc.strerror}); check the path"
        ) from exc


class Digests:
    """sha256 of files, computed on one background thread (hashlib releases the GIL);
    `get` waits for one. Digests given by the caller are used as they are."""

    def __init__(self, **files: tuple[Path, str | None]) -> None:
        self._done = {name: d for name, (_, d) in files.items() if d}
        todo = {name: p for name, (p, d) in files.items() if not d}
        self._pool = ThreadPoolExecutor(1) if todo else None
        self._futures = {n: self._pool.submit(file_digest, p) for n, p in todo.items()}
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def get(self, name: str) -> str:
        if name not in self._done:
            self._done[name] = self._futures.pop(name).result()
        return self._done[name]


def record_key(
    base_gguf: Path,
    corpus: Path,
    *,
    ctx: int,
    chunk_range: tuple[int, int],
    settings: RunnerSettings | None = None,
    base_sha256: str | None = None,
    corpus_sha256: str | None = None,
) -> RecordKey:
    settings = settings or RunnerSettings()
    return RecordKey(
        base_sha256=base_sha256 or file_digest(base_gguf),
        corpus_sha256=corpus_sha256 or file_digest(corpus),
        ctx=ctx,
        settings=tuple(sorted(settings.logits_key().items())),
        chunk_start=chunk_range[0],
        chunk_end=chunk_range[1],
    )


def compute_base_records(
    base_gguf: Path,
    corpus: Path,
    *,
    ctx: int,
    chunk_range: tuple[int, int] | None = None,
    chunks: int | None = None,
    settings: RunnerSettings | None = None,
    out: Path | None = None,
    workdir: Path | None = None,
    base_sha256: str | None = None,
    corpus_sha256: str | None = None,
) -> Path:
    """Run the base model over chunks [start, end) of the corpus and write their compact
    log-prob record. Returns the record's path: `out`, else `workdir / key.store_key()`
    (an existing complete record there is reused, not recomputed).

    Raises EvaluationError (corpus too short, bad range, llama.cpp failure).
    """
    base_gguf, corpus = Path(base_gguf), Path(corpus)
    # the digests are only needed for the key: computed beside the model's work, and
    # waited for when a record to reuse must be checked, or at the end
    digests = Digests(base=(base_gguf, base_sha256), corpus=(corpus, corpus_sha256))
    return write_base_records(
        base_gguf, corpus, ctx=ctx, chunk_range=chunk_range, chunks=chunks, settings=settings,
        out=out, workdir=workdir, digests=digests,
    )  # fmt: skip


def write_base_records(
    base_gguf: Path,
    corpus: Path,
    *,
    ctx: int,
    chunk_range: tuple[int, int] | None,
    chunks: int | None,
    settings: RunnerSettings | None,
    out: Path | None,
    workdir: Path | None,
    digests: Digests,
) -> Path:
    settings = settings or RunnerSettings()
    text = read_corpus_text(corpus)
    with LogitsRunner(base_gguf, ctx=ctx, settings=settings) as run:
        tokens = run.tokenize(text)
        check_corpus_len(corpus, len(tokens), ctx)
        n_chunks = min(len(tokens) // ctx, chunks) if chunks else len(tokens) // ctx
        a, b = resolve_range(n_chunks, chunk_range, str(corpus))

        def key() -> RecordKey:
            return record_key(
                base_gguf,
                corpus,
                ctx=ctx,
                chunk_range=(a, b),
                settings=settings,
                base_sha256=digests.get("base"),
                corpus_sha256=digests.get("corpus"),
            )

        if out is None:
            out = Path(workdir or tempfile.mkdtemp(prefix="qatgguf-eval-")) / key().store_key()
        out = Path(out)
        if out.is_file():
            try:
                if BaseRecords(out).key == key_dict(key()):
                    return out
            except EvaluationError:
                pass  # unreadable: recompute and replace
        w = RecordWriter(run.n_vocab)
        work = RowWork(run.n_vocab, settings.n_threads or default_threads())
        first = ctx // 2
        try:
            for i, logits in run.chunk_logits(
                {i: tokens[i * ctx : (i + 1) * ctx] for i in range(a, b)}
            ):
                t = tokens[i * ctx : (i + 1) * ctx]
                w.tokens.append(t)
                targets = t[first + 1 :].astype(np.int64)
                for lo in range(0, len(targets), ROW_BLOCK):
                    w.add_logits(logits[lo : lo + ROW_BLOCK], targets[lo : lo + ROW_BLOCK], work)
        finally:
            work.close()
        header = {
            "key": key_dict(key()),
            "ctx": ctx,
            "n_vocab": run.n_vocab,
            "chunk_start": a,
            "chunk_end": b,
            "n_corpus_tokens": len(tokens),
            "n_chunks_total": n_chunks,
            "add_bos": run.add_bos,
            "base_file": base_gguf.name,
            "base_size": base_gguf.stat().st_size,
        }
        w.write(out, header)
    return out
