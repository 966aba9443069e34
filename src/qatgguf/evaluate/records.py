"""Base-model log-prob records: the `.qgkl` file format, written and read (`BaseRecords`).

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
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qatgguf.errors import EvaluationError
from qatgguf.evaluate.metrics import KLD_LOG_PROB_FLOOR as M_FLOOR
from qatgguf.evaluate.metrics import QuantizedLogProbs, TokenValues
from qatgguf.evaluate.rowwork import RowWork
from qatgguf.files import atomic_output

MAGIC = b"QGKLREC1"
LLAMACPP_MAGIC = b"_logits_"
FORMAT_VERSION = 1
KEEP_FLOOR = np.float32(-16.5)
ALIGN = 64
ROW_BLOCK = 64  # rows encoded at once: bounds memory at 262k vocab (64 x 262144 x 2 B)


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


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_arrays(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write header + arrays to a temporary name, then rename (never a partial file)."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        layout[name] = {"offset": offset, "dtype": a.dtype.str, "shape": list(a.shape)}
        offset = aligned(offset + a.nbytes)
    header = {**header, "arrays": layout}
    hb = json.dumps(header, sort_keys=True).encode()
    data_start = aligned(len(MAGIC) + 8 + len(hb))
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
                    data_start = aligned(16 + hl)
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

    def token_values(self, i: int, logits: np.ndarray, work: RowWork) -> TokenValues:
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


class RecordWriter:
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

    def add_logits(self, logits: np.ndarray, targets: np.ndarray, work: RowWork) -> None:
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
        write_arrays(
            path,
            {**header, "version": FORMAT_VERSION, "dense_rows": n_dense, "rows": len(self.idx_len)},
            arrays,
        )


def key_dict(key: RecordKey) -> dict:
    d = asdict(key)
    d["settings"] = dict(key.settings)
    return json.loads(json.dumps(d))
