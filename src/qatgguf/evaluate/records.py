"""Base-model log-prob records, per-range KLD evaluation and the exact merge.

What a base record keeps (per scored token) and why:
    llama.cpp's `--kl-divergence-base` file stores every scored token's full 16-bit
    log-prob row (2 bytes x vocab + 8; ~0.5 MB per token at Gemma 4's 262,144 tokens).
    The metrics only read (a) the target token's log-prob, (b) the argmax and (c) the
    entries with log p > -16, because the KLD sum skips the rest
    (ref: perplexity.cpp `if (p_log_base > -16.f)`). We keep the same 16-bit encoding
    (scale, min log-prob, u16 codes; ref: perplexity.cpp log_softmax(..., uint16_t *, ...))
    but store only the codes whose log-prob is above -16.5 (a margin over -16 so that
    rounding differences cannot drop a term; a zero code decodes exactly to the row
    minimum and is kept only when that is above -16), as (u32 index, u16 code) pairs, plus the
    target's code. A row where that is not smaller than the dense row is stored dense.
    Every statistic computed from our record equals the one computed from llama.cpp's,
    and `export_llamacpp` writes a file that `llama-perplexity --kl-divergence-base`
    reads and that gives the same numbers (dropped codes are written as 0, which decodes
    to the row's minimum, below -16).

File layout (`.qgkl`): magic `QGKLREC1`, u64 header length, JSON header (key, shapes,
array offsets), then 64-byte aligned little-endian arrays. Records are keyed by
(base sha256, corpus sha256, ctx, logits-changing settings, chunk range); see
`RecordKey.store_key`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qatgguf.errors import EvaluationError
from qatgguf.files import atomic_output, sha256_file
from qatgguf.evaluate.metrics import KLD_LOG_PROB_FLOOR as M_FLOOR
from qatgguf.evaluate.metrics import QuantizedLogProbs, TokenValues, summarize
from qatgguf.evaluate.runner import LogitsRunner, RunnerSettings, read_corpus_text

MAGIC = b"QGKLREC1"
LLAMACPP_MAGIC = b"_logits_"
FORMAT_VERSION = 1
KEEP_FLOOR = np.float32(-16.5)
_ALIGN = 64
_ROW_BLOCK = 64  # rows encoded at once: bounds memory at 262k vocab (64 x 262144 x 2 B)


def file_digest(path: Path) -> str:
    """The sha256 of an input file; raises EvaluationError naming it when it is unreadable."""
    try:
        return sha256_file(path)[0]
    except OSError as exc:
        raise EvaluationError(
            f"{path}: file not found or unreadable ({exc.strerror}); check the path"
        ) from exc


class _Digests:
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


def default_threads() -> int:
    """Threads for the per-row work when the settings name none: llama-perplexity shares it
    among all CPUs (ref: perplexity.cpp `std::thread::hardware_concurrency()` workers);
    here OMP_NUM_THREADS when set (Ray sets it to a task's CPUs), else the CPUs this
    process may run on."""
    from qatgguf.quant.api import default_threads as cpus

    return cpus()


class _RowWork:
    """Runs a row kernel over a batch of rows on `threads` threads (the kernels release
    the GIL), each thread on its own rows with its own scratch (`kernels.scratch`)."""

    def __init__(self, n_vocab: int, threads: int) -> None:
        from qatgguf.evaluate import kernels

        self.threads = max(1, threads)
        self.port = kernels.use_port()
        self.with_fma = kernels.WITH_FMA
        self._scratch = [kernels.scratch(n_vocab) for _ in range(self.threads)]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def run(self, n: int, fn: Callable[[np.ndarray, int, int], None]) -> None:
        """fn(scratch, r0, r1) over [0, n) cut into one contiguous part per thread."""
        parts = [(n * k // self.threads, n * (k + 1) // self.threads) for k in range(self.threads)]
        parts = [(k, a, b) for k, (a, b) in enumerate(parts) if b > a]
        if self._pool is None or len(parts) == 1:
            for k, a, b in parts:
                fn(self._scratch[k], a, b)
            return
        for f in [self._pool.submit(fn, self._scratch[k], a, b) for k, a, b in parts]:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


@dataclass(frozen=True)
class RecordKey:
    """Identity of a base record: the same key means the same bytes."""

    base_sha256: str
    corpus_sha256: str
    ctx: int
    settings: tuple[tuple[str, object], ...]
    chunk_start: int
    chunk_end: int

    def settings_tag(self) -> str:
        return hashlib.sha256(json.dumps(dict(self.settings), sort_keys=True).encode()).hexdigest()[
            :12
        ]

    def store_key(self) -> str:
        """Relative artifact-store key, e.g. `eval-base/<base sha>/<corpus sha16>/c256-<tag>/chunks-00000-00016.qgkl`."""
        return (
            f"eval-base/{self.base_sha256}/{self.corpus_sha256[:16]}/c{self.ctx}-{self.settings_tag()}/"
            f"chunks-{self.chunk_start:05d}-{self.chunk_end:05d}.qgkl"
        )


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _write_arrays(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write header + arrays to a temporary name, then rename (never a partial file)."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        layout[name] = {"offset": offset, "dtype": a.dtype.str, "shape": list(a.shape)}
        offset = _aligned(offset + a.nbytes)
    header = {**header, "arrays": layout}
    hb = json.dumps(header, sort_keys=True).encode()
    data_start = _aligned(len(MAGIC) + 8 + len(hb))
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(hb)) + hb)
        for name, a in arrays.items():
            f.seek(data_start + layout[name]["offset"])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(data_start + offset)


class BaseRecords:
    """A base record (ours or llama.cpp's `_logits_` file) opened for reading (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(8)
                if magic == MAGIC:
                    (hl,) = struct.unpack("<Q", f.read(8))
                    self.header = json.loads(f.read(hl))
                    data_start = _aligned(16 + hl)
                elif magic == LLAMACPP_MAGIC:
                    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
                    self.header = {
                        "format": "llama.cpp",
                        "ctx": n_ctx,
                        "n_vocab": n_vocab,
                        "chunk_start": 0,
                        "chunk_end": n_chunk,
                        "key": None,
                    }
                    data_start = 20
                else:
                    raise EvaluationError(
                        f"{self.path}: not a base record (magic {magic!r}); expected {MAGIC!r} from "
                        "compute_base_records or b'_logits_' from llama-perplexity --kl-divergence-base"
                    )
        except OSError as exc:
            raise EvaluationError(f"{self.path}: cannot read base record: {exc}") from exc
        self.ctx = int(self.header["ctx"])
        self.n_vocab = int(self.header["n_vocab"])
        self.chunk_start = int(self.header["chunk_start"])
        self.chunk_end = int(self.header["chunk_end"])
        self.n_scored = self.ctx - 1 - self.ctx // 2
        self.llamacpp = self.header.get("format") == "llama.cpp"
        raw = np.memmap(self.path, dtype=np.uint8, mode="r").view(
            np.ndarray
        )  # plain views: cheap indexing
        n_chunks = self.chunk_end - self.chunk_start
        if self.llamacpp:
            ntok = self.ctx * n_chunks
            self._tokens = (
                raw[data_start : data_start + 4 * ntok].view(np.int32).reshape(n_chunks, self.ctx)
            )
            nv = 2 * ((self.n_vocab + 1) // 2) + 4
            start = data_start + 4 * ntok
            need = start + 2 * nv * n_chunks * self.n_scored
            if raw.size < need:
                raise EvaluationError(
                    f"{self.path}: truncated llama.cpp base file ({raw.size} bytes, need {need})"
                )
            self._rows = raw[start:need].view(np.uint16).reshape(n_chunks * self.n_scored, nv)
        else:
            if self.header.get("version") != FORMAT_VERSION:
                raise EvaluationError(
                    f"{self.path}: record format version {self.header.get('version')}, expected {FORMAT_VERSION}"
                )
            self._a = {}
            for name, spec in self.header["arrays"].items():
                dt = np.dtype(spec["dtype"])
                count = int(np.prod(spec["shape"])) if spec["shape"] else 1
                off = data_start + spec["offset"]
                if raw.size < off + count * dt.itemsize:
                    raise EvaluationError(f"{self.path}: truncated record (array {name!r})")
                self._a[name] = raw[off : off + count * dt.itemsize].view(dt).reshape(spec["shape"])
            self._tokens = self._a["tokens"]

    @property
    def key(self) -> dict | None:
        return self.header.get("key")

    def chunk_tokens(self, i: int) -> np.ndarray:
        self._check(i)
        return np.asarray(self._tokens[i - self.chunk_start])

    def _check(self, i: int) -> None:
        if not self.chunk_start <= i < self.chunk_end:
            raise EvaluationError(
                f"{self.path}: chunk {i} is outside this record's range [{self.chunk_start}, {self.chunk_end})"
            )

    def chunk_rows(self, i: int, lo: int = 0, hi: int | None = None) -> QuantizedLogProbs:
        """Scored rows lo..hi of chunk i, decoded to llama.cpp's dense 16-bit form."""
        self._check(i)
        hi = self.n_scored if hi is None else hi
        r0 = (i - self.chunk_start) * self.n_scored
        if self.llamacpp:
            rows = np.asarray(self._rows[r0 + lo : r0 + hi])
            sm = rows[:, :4].copy().view(np.float32)
            return QuantizedLogProbs(
                scale=sm[:, 0].copy(),
                min_log_prob=sm[:, 1].copy(),
                q=rows[:, 4 : 4 + self.n_vocab].copy(),
            )
        a = self._a
        q = np.zeros((hi - lo, self.n_vocab), dtype=np.uint16)
        vp, ip = a["val_ptr"], a["idx_ptr"]
        for k, r in enumerate(range(r0 + lo, r0 + hi)):
            v = a["values"][vp[r] : vp[r + 1]]
            if ip[r + 1] == ip[r]:
                q[k] = v
            else:
                q[k, a["indices"][ip[r] : ip[r + 1]]] = v
        # the target's code is kept even when it is below the floor (it sets the base NLL)
        tgt = self.chunk_tokens(i)[self.ctx // 2 + 1 + lo : self.ctx // 2 + 1 + hi]
        q[np.arange(hi - lo), tgt] = a["target_q"][r0 + lo : r0 + hi]
        return QuantizedLogProbs(
            scale=np.array(a["scale"][r0 + lo : r0 + hi]),
            min_log_prob=np.array(a["min_log_prob"][r0 + lo : r0 + hi]),
            q=q,
        )

    def token_values(self, i: int, logits: np.ndarray, work: _RowWork) -> TokenValues:
        """Per-token values of chunk i from the quant's logits of its scored rows
        [ctx-1-ctx/2, vocab], against this record: `metrics.token_values`' numbers,
        computed as llama-perplexity computes them (see `kernels`)."""
        from qatgguf.evaluate import kernels

        self._check(i)
        targets = self.chunk_tokens(i)[self.ctx // 2 + 1 :].astype(np.int64)
        n = len(targets)
        x = np.ascontiguousarray(logits, dtype=np.float32)
        if x.shape != (n, self.n_vocab):
            raise EvaluationError(
                f"{self.path}: chunk {i} needs logits of shape {(n, self.n_vocab)}, got {x.shape}"
            )
        out = (
            np.empty(n, np.float32),
            np.empty(n, np.float32),
            np.empty(n, np.float64),
            np.empty(n, np.float32),
            np.empty(n, np.bool_),
        )
        r0 = (i - self.chunk_start) * self.n_scored
        if self.llamacpp:
            none16, none32 = np.zeros(0, np.uint16), np.zeros(0, np.uint32)
            nonef, nonei = np.zeros(0, np.float32), np.zeros(0, np.int64)
            args = (nonef, nonef, none16, none16, none32, nonei, nonei, self._rows)
        else:
            a = self._a
            args = (a["scale"], a["min_log_prob"], a["target_q"], a["values"], a["indices"],
                    a["val_ptr"], a["idx_ptr"], np.zeros((0, 0), np.uint16))  # fmt: skip

        def fn(e: np.ndarray, lo: int, hi: int) -> None:
            kernels.kld_rows(x, targets, *args, r0, *out, e, lo, hi, work.port, work.with_fma)

        work.run(n, fn)
        return TokenValues(*out)


class _RecordWriter:
    """Accumulates encoded rows of consecutive chunks."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.tokens: list[np.ndarray] = []
        self.scale: list[np.ndarray] = []
        self.min_lp: list[np.ndarray] = []
        self.target_q: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.val_len: list[int] = []
        self.idx_len: list[int] = []
        self._q: np.ndarray | None = None  # add_logits' scratch: codes, kept pairs
        self._idx: np.ndarray | None = None
        self._val: np.ndarray | None = None

    def add_rows(self, rec: QuantizedLogProbs, targets: np.ndarray) -> None:
        n = len(targets)
        self.scale.append(rec.scale)
        self.min_lp.append(rec.min_log_prob)
        self.target_q.append(rec.q[np.arange(n), targets])
        # A code of 0 decodes to exactly min_log_prob (no rounding), which the KLD sum skips
        # unless it is above -16; other codes get the margin.
        keep = np.where(
            rec.q > 0, rec.log_probs() > KEEP_FLOOR, (rec.min_log_prob > M_FLOOR)[:, None]
        )
        for r in range(n):
            k = int(keep[r].sum())
            if k * 6 >= self.n_vocab * 2:  # (u32, u16) pairs no smaller than the dense row
                self.values.append(rec.q[r])
                self.val_len.append(self.n_vocab)
                self.idx_len.append(0)
            else:
                idx = np.flatnonzero(keep[r]).astype(np.uint32)
                self.indices.append(idx)
                self.values.append(rec.q[r, idx])
                self.val_len.append(k)
                self.idx_len.append(k)

    def add_logits(self, logits: np.ndarray, targets: np.ndarray, work: _RowWork) -> None:
        """Encode float32 logits [n, vocab] (perplexity.cpp's 16-bit record, see `kernels`)
        and add the rows: the same bytes as `add_rows(quantize_log_probs(logits), targets)`
        up to the last bit of each row's log-sum-exp, which here is the tool's."""
        from qatgguf.evaluate import kernels

        x = np.ascontiguousarray(logits, dtype=np.float32)
        n = x.shape[0]
        tg = np.ascontiguousarray(targets, dtype=np.int64)
        scale = np.empty(n, np.float32)
        min_lp = np.empty(n, np.float32)
        target_q = np.empty(n, np.uint16)
        kept = np.empty(n, np.int64)
        if self._q is None or len(self._q) < n:
            # reused from block to block: fresh pages of a 64-row block cost more to
            # fault in than the kernel spends on it
            cap = self.n_vocab // 3 + 1  # a row stored as pairs keeps fewer than a third
            self._q = np.empty((n, self.n_vocab), np.uint16)
            self._idx = np.empty((n, cap), np.uint32)
            self._val = np.empty((n, cap), np.uint16)
        q, idx, val = self._q[:n], self._idx[:n], self._val[:n]

        def fn(e: np.ndarray, a: int, b: int) -> None:
            kernels.encode_rows(
                x, tg, scale, min_lp, target_q, kept, q, idx, val, e, a, b, work.port,
                work.with_fma,
            )  # fmt: skip

        work.run(n, fn)
        self.scale.append(scale)
        self.min_lp.append(min_lp)
        self.target_q.append(target_q)
        for r in range(n):
            k = int(kept[r])
            if k * 6 >= self.n_vocab * 2:  # (u32, u16) pairs no smaller than the dense row
                self.values.append(q[r].copy())
                self.val_len.append(self.n_vocab)
                self.idx_len.append(0)
            else:
                self.indices.append(idx[r, :k].copy())
                self.values.append(val[r, :k].copy())
                self.val_len.append(k)
                self.idx_len.append(k)

    def write(self, path: Path, header: dict) -> None:
        def cat(parts: list[np.ndarray], dt: type) -> np.ndarray:
            return np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)

        arrays = {
            "tokens": np.stack(self.tokens).astype(np.int32),
            "scale": cat(self.scale, np.float32),
            "min_log_prob": cat(self.min_lp, np.float32),
            "target_q": cat(self.target_q, np.uint16),
            "val_ptr": np.concatenate([[0], np.cumsum(self.val_len)]).astype(np.int64),
            "idx_ptr": np.concatenate([[0], np.cumsum(self.idx_len)]).astype(np.int64),
            "values": cat(self.values, np.uint16),
            "indices": cat(self.indices, np.uint32),
        }
        n_dense = sum(1 for n in self.idx_len if n == 0)
        _write_arrays(
            path,
            {**header, "version": FORMAT_VERSION, "dense_rows": n_dense, "rows": len(self.idx_len)},
            arrays,
        )


def _check_corpus_len(corpus: Path, n_tokens: int, ctx: int) -> None:
    if n_tokens < 2 * ctx:
        # ref: perplexity.cpp "you need at least %d tokens to evaluate perplexity with a context of %d"
        raise EvaluationError(
            f"{corpus}: tokenizes to only {n_tokens} tokens; a context of {ctx} needs at least {2 * ctx} "
            f"(two chunks, as llama-perplexity requires); use a longer corpus or a smaller --ctx"
        )


def _resolve_range(
    n_chunks: int, chunk_range: tuple[int, int] | None, what: str
) -> tuple[int, int]:
    a, b = chunk_range if chunk_range is not None else (0, n_chunks)
    if not (0 <= a < b <= n_chunks):
        raise EvaluationError(
            f"{what}: chunk range [{a}, {b}) is not inside [0, {n_chunks}); pick a range within it"
        )
    return a, b


def plan_chunk_ranges(n_chunks: int, *, n_parts: int, n_seq: int = 1) -> list[tuple[int, int]]:
    """Cut [0, n_chunks) into at most n_parts contiguous ranges whose starts are multiples of
    n_seq, so each range batches its chunks as a whole-corpus run does (same logits)."""
    if n_chunks < 1 or n_parts < 1 or n_seq < 1:
        raise EvaluationError(
            f"plan_chunk_ranges needs n_chunks, n_parts, n_seq >= 1, got {n_chunks}, {n_parts}, {n_seq}"
        )
    groups = -(-n_chunks // n_seq)
    n_parts = min(n_parts, groups)
    bounds = [round(k * groups / n_parts) * n_seq for k in range(n_parts + 1)]
    bounds[-1] = n_chunks
    return [(bounds[k], bounds[k + 1]) for k in range(n_parts)]


def count_chunks(base_gguf: Path, corpus: Path, *, ctx: int, chunks: int | None = None) -> int:
    """Number of ctx-token chunks llama-perplexity would evaluate (`--chunks` caps it)."""
    import llama_cpp

    from qatgguf.evaluate.runner import quiet_llama

    quiet_llama()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(base_gguf).encode(), mp)
    if not model:
        raise EvaluationError(f"{base_gguf}: llama.cpp could not load this GGUF's vocabulary")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        raw = read_corpus_text(corpus).encode("utf-8")
        n = -llama_cpp.llama_tokenize(vocab, raw, len(raw), None, 0, True, False)
    finally:
        llama_cpp.llama_model_free(model)
    _check_corpus_len(corpus, n, ctx)
    return min(n // ctx, chunks) if chunks else n // ctx


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
    digests = _Digests(base=(base_gguf, base_sha256), corpus=(corpus, corpus_sha256))
    return _base_records(
        base_gguf, corpus, ctx=ctx, chunk_range=chunk_range, chunks=chunks, settings=settings,
        out=out, workdir=workdir, digests=digests,
    )  # fmt: skip


def _base_records(
    base_gguf: Path,
    corpus: Path,
    *,
    ctx: int,
    chunk_range: tuple[int, int] | None,
    chunks: int | None,
    settings: RunnerSettings | None,
    out: Path | None,
    workdir: Path | None,
    digests: _Digests,
) -> Path:
    settings = settings or RunnerSettings()
    text = read_corpus_text(corpus)
    with LogitsRunner(base_gguf, ctx=ctx, settings=settings) as run:
        tokens = run.tokenize(text)
        _check_corpus_len(corpus, len(tokens), ctx)
        n_chunks = min(len(tokens) // ctx, chunks) if chunks else len(tokens) // ctx
        a, b = _resolve_range(n_chunks, chunk_range, str(corpus))

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
                if BaseRecords(out).key == _key_dict(key()):
                    return out
            except EvaluationError:
                pass  # unreadable: recompute and replace
        w = _RecordWriter(run.n_vocab)
        work = _RowWork(run.n_vocab, settings.n_threads or default_threads())
        first = ctx // 2
        try:
            for i, logits in run.chunk_logits(
                {i: tokens[i * ctx : (i + 1) * ctx] for i in range(a, b)}
            ):
                t = tokens[i * ctx : (i + 1) * ctx]
                w.tokens.append(t)
                targets = t[first + 1 :].astype(np.int64)
                for lo in range(0, len(targets), _ROW_BLOCK):
                    w.add_logits(logits[lo : lo + _ROW_BLOCK], targets[lo : lo + _ROW_BLOCK], work)
        finally:
            work.close()
        header = {
            "key": _key_dict(key()),
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


def _key_dict(key: RecordKey) -> dict:
    d = asdict(key)
    d["settings"] = dict(key.settings)
    return json.loads(json.dumps(d))


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
    return _evaluate_chunks(
        quant_gguf, base_records, chunk_range=chunk_range, settings=settings,
        n_threads=n_threads, n_gpu_layers=n_gpu_layers,
        digests=_Digests(quant=(quant_gguf, quant_sha256)),
    )  # fmt: skip


def _evaluate_chunks(
    quant_gguf: Path,
    base_records: Path | Sequence[Path],
    *,
    chunk_range: tuple[int, int] | None,
    settings: RunnerSettings | None,
    n_threads: int | None,
    n_gpu_layers: int | None,
    digests: _Digests,
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
        work = _RowWork(n_vocab, settings.n_threads or default_threads())
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


@dataclass(frozen=True)
class EvalResult:
    """The evaluation of one quant against its base; `to_dict()` is the JSON the CLI prints."""

    mean_kld: float
    mean_kld_err: float
    kld_max: float
    kld_99_9: float
    kld_99: float
    kld_95: float
    kld_90: float
    kld_median: float
    kld_10: float
    kld_5: float
    kld_1: float
    kld_0_1: float
    kld_min: float
    same_top_p: float
    same_top_p_err: float
    ppl_base: float
    ppl_base_err: float
    ppl_quant: float
    ppl_quant_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    ln_ppl_correlation: float
    dp_mean: float
    dp_mean_err: float
    dp_rms: float
    dp_rms_err: float
    dp_max: float
    dp_99_9: float
    dp_99: float
    dp_95: float
    dp_90: float
    dp_75: float
    dp_median: float
    dp_25: float
    dp_10: float
    dp_5: float
    dp_1: float
    dp_0_1: float
    dp_min: float
    n_tokens: int
    n_chunks: int
    ctx: int
    base_size: int | None
    quant_size: int
    base_sha256: str | None
    quant_sha256: str
    corpus_sha256: str | None

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)

    def format_table(self) -> str:
        """The summary in llama-perplexity's layout (Δp in percent)."""
        pct = 100.0
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl_quant:10.6f} ± {self.ppl_quant_err:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_err:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {pct * self.ln_ppl_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ppl_ratio:10.6f} ± {self.ln_ppl_ratio_err:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {self.ppl_ratio:10.6f} ± {self.ppl_ratio_err:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {self.ppl_diff:10.6f} ± {self.ppl_diff_err:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.mean_kld:10.6f} ± {self.mean_kld_err:10.6f}",
            f"Maximum KLD: {self.kld_max:10.6f}",
            f"99.9%   KLD: {self.kld_99_9:10.6f}",
            f"99.0%   KLD: {self.kld_99:10.6f}",
            f"95.0%   KLD: {self.kld_95:10.6f}",
            f"90.0%   KLD: {self.kld_90:10.6f}",
            f"Median  KLD: {self.kld_median:10.6f}",
            f"10.0%   KLD: {self.kld_10:10.6f}",
            f" 5.0%   KLD: {self.kld_5:10.6f}",
            f" 1.0%   KLD: {self.kld_1:10.6f}",
            f" 0.1%   KLD: {self.kld_0_1:10.6f}",
            f"Minimum KLD: {self.kld_min:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {pct * self.dp_mean:6.3f} ± {pct * self.dp_mean_err:5.3f} %",
            f"Maximum Δp: {pct * self.dp_max:6.3f}%",
            f"99.9%   Δp: {pct * self.dp_99_9:6.3f}%",
            f"99.0%   Δp: {pct * self.dp_99:6.3f}%",
            f"95.0%   Δp: {pct * self.dp_95:6.3f}%",
            f"90.0%   Δp: {pct * self.dp_90:6.3f}%",
            f"75.0%   Δp: {pct * self.dp_75:6.3f}%",
            f"Median  Δp: {pct * self.dp_median:6.3f}%",
            f"25.0%   Δp: {pct * self.dp_25:6.3f}%",
            f"10.0%   Δp: {pct * self.dp_10:6.3f}%",
            f" 5.0%   Δp: {pct * self.dp_5:6.3f}%",
            f" 1.0%   Δp: {pct * self.dp_1:6.3f}%",
            f" 0.1%   Δp: {pct * self.dp_0_1:6.3f}%",
            f"Minimum Δp: {pct * self.dp_min:6.3f}%",
            f"RMS Δp    : {pct * self.dp_rms:6.3f} ± {pct * self.dp_rms_err:5.3f} %",
            f"Same top p: {pct * self.same_top_p:6.3f} ± {pct * self.same_top_p_err:5.3f} %",
            "",
            (
                f"scored tokens: {self.n_tokens} in {self.n_chunks} chunks of {self.ctx}; "
                f"sizes: base {self.base_size} B, quant {self.quant_size} B"
            ),
        ]
        return "\n".join(lines)


def merge(stats: Sequence[RangeValues]) -> EvalResult:
    """Join range results into one EvalResult. Exact: per-token values are concatenated in
    chunk order and every statistic is computed once over all of them, so the result does
    not depend on how the chunks were split. Raises EvaluationError on gaps, overlaps or
    results of different files."""
    if not stats:
        raise EvaluationError("merge: no chunk results given")
    s = sorted(stats, key=lambda c: c.chunk_start)
    ident = {(c.ctx, c.n_vocab, c.base_sha256, c.corpus_sha256, c.quant_sha256) for c in s}
    if len(ident) != 1:
        raise EvaluationError(
            f"merge: chunk results come from different evaluations (ctx, vocab, base, corpus, quant): {sorted(map(str, ident))}"
        )
    for prev, cur in itertools.pairwise(s):
        if cur.chunk_start != prev.chunk_end:
            raise EvaluationError(
                f"merge: chunk ranges [{prev.chunk_start}, {prev.chunk_end}) and [{cur.chunk_start}, {cur.chunk_end}) "
                "leave a gap or overlap; evaluate each chunk exactly once"
            )
    values = TokenValues.concat([c.values for c in s])
    summary = summarize(values)
    c0 = s[0]
    return EvalResult(
        **summary,
        n_chunks=s[-1].chunk_end - c0.chunk_start,
        ctx=c0.ctx,
        base_size=c0.base_size,
        quant_size=c0.quant_size,
        base_sha256=c0.base_sha256,
        quant_sha256=c0.quant_sha256,
        corpus_sha256=c0.corpus_sha256,
    )


def evaluate(
    base: Path,
    quant: Path,
    corpus: Path,
    *,
    ctx: int,
    chunks: int | None = None,
    workdir: Path | None = None,
    settings: RunnerSettings | None = None,
) -> EvalResult:
    """Everything in-process: base records (reused from `workdir` when present), the quant's
    evaluation and the summary. Raises EvaluationError."""
    settings = settings or RunnerSettings()
    base, quant, corpus = Path(base), Path(quant), Path(corpus)
    # All three digests start now, on one thread: most of the hashing then runs while the
    # process imports, loads the models and tokenizes, which keep one core busy; both
    # are needed only when the record's key and the result are written (without a
    # workdir nothing is reused, so the key can wait until the record is written).
    digests = _Digests(base=(base, None), quant=(quant, None), corpus=(corpus, None))
    with tempfile.TemporaryDirectory(prefix="qatgguf-eval-") as tmp:
        rec = _base_records(
            base, corpus, ctx=ctx, chunk_range=None, chunks=chunks, settings=settings,
            out=None if workdir else Path(tmp) / "base.qgkl",
            workdir=Path(workdir) if workdir else None, digests=digests,
        )  # fmt: skip
        stats = _evaluate_chunks(
            quant, rec, chunk_range=None, settings=settings, n_threads=None,
            n_gpu_layers=None, digests=digests,
        )  # fmt: skip
        return merge([stats])


def export_llamacpp(records: Sequence[Path], out: Path) -> Path:
    """Write the chunks of `records` (contiguous) as a llama.cpp `--kl-divergence-base` file.

    ref: perplexity.cpp perplexity(): "_logits_", u32 n_ctx, i32 n_vocab, i32 n_chunk,
    i32 tokens[n_ctx*n_chunk], then per scored token (u16 x (2*ceil(n_vocab/2)+4)):
    f32 scale, f32 min_log_prob, u16 codes.
    """
    recs = sorted((BaseRecords(p) for p in records), key=lambda r: r.chunk_start)
    if not recs:
        raise EvaluationError("export_llamacpp: no records given")
    for p, c in itertools.pairwise(recs):
        if c.chunk_start != p.chunk_end or (c.ctx, c.n_vocab) != (p.ctx, p.n_vocab):
            raise EvaluationError(f"export_llamacpp: {c.path} does not continue {p.path}")
    ctx, nv_tok = recs[0].ctx, recs[0].n_vocab
    nv = 2 * ((nv_tok + 1) // 2) + 4
    n_chunk = recs[-1].chunk_end - recs[0].chunk_start
    out = Path(out)
    with atomic_output(out) as tmp, open(tmp, "wb") as f:
        f.write(LLAMACPP_MAGIC + struct.pack("<Iii", ctx, nv_tok, n_chunk))
        for r in recs:
            f.writelines(
                r.chunk_tokens(i).astype("<i4").tobytes() for i in range(r.chunk_start, r.chunk_end)
            )
        for r in recs:
            for i in range(r.chunk_start, r.chunk_end):
                q = r.chunk_rows(i)
                row = np.zeros((len(q.scale), nv), dtype=np.uint16)
                row[:, :4] = (
                    np.stack([q.scale, q.min_log_prob], axis=1).astype("<f4").view(np.uint16)
                )
                row[:, 4 : 4 + nv_tok] = q.q
                f.write(row.tobytes())
    return out
