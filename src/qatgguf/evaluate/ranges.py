"""Per-token values of one chunk range of a quantized file against the base records
(`RangeValues`), saved and loaded as `.npz`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qatgguf.errors import EvaluationError
from qatgguf.evaluate.base import Digests
from qatgguf.evaluate.metrics import TokenValues
from qatgguf.evaluate.records import BaseRecords
from qatgguf.evaluate.rowwork import RowWork, default_threads
from qatgguf.evaluate.runner import LogitsRunner, RunnerSettings
from qatgguf.files import atomic_output


@dataclass(frozen=True)
class RangeValues:
    """Per-token values of one evaluated chunk range: small, and merged exactly by `merge`."""

    chunk_start: int
    chunk_end: int
    ctx: int
    n_vocab: int
    base_sha256: str | None
    corpus_sha256: str | None
    quant_sha256: str
    base_size: int | None
    quant_size: int
    values: TokenValues = field(repr=False)

    _FIELDS = ("nll", "nll_base", "kld", "p_diff", "same_top")

    def save(self, path: Path) -> Path:
        meta = {
            k: getattr(self, k)
            for k in (
                "chunk_start",
                "chunk_end",
                "ctx",
                "n_vocab",
                "base_sha256",
                "corpus_sha256",
                "quant_sha256",
                "base_size",
                "quant_size",
            )
        }
        path = Path(path)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                **{k: getattr(self.values, k) for k in self._FIELDS},
            )
        return path

    @classmethod
    def load(cls, path: Path) -> RangeValues:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes())
            return cls(**meta, values=TokenValues(*(z[k] for k in cls._FIELDS)))


def evaluate_chunks(
    quant_gguf: Path,
    base_records: Path | Sequence[Path],
    *,
    chunk_range: tuple[int, int] | None = None,
    settings: RunnerSettings | None = None,
    quant_sha256: str | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int | None = None,
) -> RangeValues:
    """Evaluate the quant on chunks [start, end) against base records (ours or llama.cpp's).

    `settings` defaults to the ones the record was made with (so the logits are comparable);
    threads and GPU offload can be set separately. Raises EvaluationError.
    """
    quant_gguf = Path(quant_gguf)
    return evaluate_chunk_range(
        quant_gguf, base_records, chunk_range=chunk_range, settings=settings,
        n_threads=n_threads, n_gpu_layers=n_gpu_layers,
        digests=Digests(quant=(quant_gguf, quant_sha256)),
    )  # fmt: skip


def evaluate_chunk_range(
    quant_gguf: Path,
    base_records: Path | Sequence[Path],
    *,
    chunk_range: tuple[int, int] | None,
    settings: RunnerSettings | None,
    n_threads: int | None,
    n_gpu_layers: int | None,
    digests: Digests,
) -> RangeValues:
    recs = [
        BaseRecords(p)
        for p in ([base_records] if isinstance(base_records, (str, Path)) else base_records)
    ]
    if not recs:
        raise EvaluationError("evaluate_chunks: no base records given")
    ctx, n_vocab = recs[0].ctx, recs[0].n_vocab
    for r in recs:
        if (r.ctx, r.n_vocab) != (ctx, n_vocab):
            raise EvaluationError(
                f"{r.path}: ctx/vocab ({r.ctx}, {r.n_vocab}) differ from {recs[0].path} ({ctx}, {n_vocab})"
            )
    lo, hi = min(r.chunk_start for r in recs), max(r.chunk_end for r in recs)
    a, b = chunk_range if chunk_range is not None else (lo, hi)
    owner = {}
    for i in range(a, b):
        owner[i] = next((r for r in recs if r.chunk_start <= i < r.chunk_end), None)
        if owner[i] is None:
            raise EvaluationError(
                f"chunk {i} of range [{a}, {b}) is in none of the base records "
                f"({', '.join(f'{r.path.name}=[{r.chunk_start},{r.chunk_end})' for r in recs)})"
            )
    key = recs[0].key or {}
    if settings is None:
        settings = RunnerSettings(**key["settings"]) if key.get("settings") else RunnerSettings()
    if n_threads is not None or n_gpu_layers is not None:
        settings = RunnerSettings(
            **{
                **asdict(settings),
                **({"n_threads": n_threads} if n_threads is not None else {}),
                **({"n_gpu_layers": n_gpu_layers} if n_gpu_layers is not None else {}),
            }
        )
    parts: list[TokenValues] = []
    with LogitsRunner(quant_gguf, ctx=ctx, settings=settings) as run:
        if run.n_vocab != n_vocab:
            # ref: perplexity.cpp "inconsistent vocabulary"
            raise EvaluationError(
                f"{quant_gguf}: vocabulary has {run.n_vocab} tokens but the base record "
                f"{recs[0].path} has {n_vocab}; evaluate a quant of the same model"
            )
        work = RowWork(n_vocab, settings.n_threads or default_threads())
        try:
            for i, logits in run.chunk_logits({i: owner[i].chunk_tokens(i) for i in range(a, b)}):
                parts.append(owner[i].token_values(i, logits, work))
        finally:
            work.close()
    return RangeValues(
        chunk_start=a,
        chunk_end=b,
        ctx=ctx,
        n_vocab=n_vocab,
        base_sha256=key.get("base_sha256"),
        corpus_sha256=key.get("corpus_sha256"),
        quant_sha256=digests.get("quant"),
        base_size=recs[0].header.get("base_size"),
        quant_size=quant_gguf.stat().st_size,
        values=TokenValues.concat(parts),
    )
