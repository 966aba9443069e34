"""Per-token logits from llama.cpp (through llama-cpp-python's low-level API), batched
exactly like `llama-perplexity` so that the logits, and therefore the metrics, are the
ones the tool computes.

ref: tools/perplexity/perplexity.cpp perplexity() and kl_divergence(); llama_perplexity()
for how the context is sized (n_seq = n_batch / n_ctx sequences, one KV stream each).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Self

import numpy as np

from qatgguf.errors import EvaluationError

log = logging.getLogger(__name__)

# llama-cpp-python's ggml is built with OpenMP. Under libgomp's default wait policy, two
# threads on a busy two-core host spin against each other: the KLD pass measured 10-25x
# slower with n_threads=2 than with OMP_WAIT_POLICY=passive (0.7 s, on par with
# llama-perplexity -t 2). libgomp reads this once, when llama_cpp is first imported, so it
# is set here, before any import of llama_cpp; a caller's own setting wins. It stays an
# import-time setting on purpose: a process may import llama_cpp through any of several
# paths (this module, the records, a caller of its own), and only the first import counts,
# so a setting made later, where an evaluation starts, could come too late.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

FlashAttn = Literal["auto", "on", "off"]
_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "bf16": 30}


@dataclass(frozen=True)
class RunnerSettings:
    """The llama.cpp settings that change logits (plus threads and offload, which do not
    change them on CPU). Defaults are llama-perplexity's: `-b 2048 -ub 512 -fa auto
    -ctk f16 -ctv f16`."""

    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: FlashAttn = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    n_threads: int | None = None
    n_gpu_layers: int = 0

    def __post_init__(self) -> None:
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise EvaluationError(
                f"n_batch and n_ubatch must be >= 1, got {self.n_batch}, {self.n_ubatch}"
            )
        if self.flash_attn not in ("auto", "on", "off"):
            raise EvaluationError(
                f"flash_attn must be 'auto', 'on' or 'off', got {self.flash_attn!r}"
            )
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in _KV_TYPES:
                raise EvaluationError(
                    f"{name}={getattr(self, name)!r} is not one of {sorted(_KV_TYPES)}"
                )

    def logits_key(self) -> dict[str, object]:
        """The settings that can change logits: part of the base-record key."""
        d = asdict(self)
        d.pop("n_threads")
        d.pop("n_gpu_layers")
        return d

    def n_seq(self, ctx: int) -> int:
        """Chunks evaluated per batch. ref: perplexity.cpp `n_seq = max(1, n_batch / n_ctx)`"""
        if not (self.n_batch < ctx or self.n_batch % ctx == 0):
            # ref: perplexity.cpp GGML_ASSERT(n_batch < n_ctx || n_batch % n_ctx == 0)
            raise EvaluationError(
                f"n_batch={self.n_batch} with ctx={ctx}: n_batch must be below ctx or a multiple of it "
                f"(llama-perplexity asserts the same); use n_batch={ctx} or {ctx * max(1, self.n_batch // ctx)}"
            )
        return max(1, self.n_batch // ctx)


_LOG_CB = None


def quiet_llama() -> None:
    """Route llama.cpp's log lines to Python logging at debug level (once per process):
    every caller that loads a model through llama_cpp calls this first."""
    global _LOG_CB
    import llama_cpp

    if _LOG_CB is not None:
        return

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level >= 4:  # GGML_LOG_LEVEL_ERROR
            log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _LOG_CB = _cb
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))


def read_corpus_text(corpus: Path) -> str:
    """The corpus text as llama-perplexity's `-f` reads it: the whole file, one trailing
    newline dropped. ref: common/arg.cpp "--file" (`params.prompt.pop_back()`)"""
    try:
        data = Path(corpus).read_bytes()
    except OSError as exc:
        raise EvaluationError(f"{corpus}: cannot read the evaluation corpus: {exc}") from exc
    text = data.decode("utf-8", errors="replace")
    return text.removesuffix("\n")


class LogitsRunner:
    """One loaded GGUF and a context sized for `ctx`-token chunks, `n_seq` per batch.

    Use as a context manager. `chunk_logits` yields, for each chunk, the float32 logits of
    the scored positions `ctx/2 .. ctx-2` (they predict tokens `ctx/2+1 .. ctx-1`).
    """

    def __init__(self, model: Path, *, ctx: int, settings: RunnerSettings | None = None) -> None:
        import llama_cpp

        if ctx < 4:
            raise EvaluationError(
                f"ctx={ctx} is too small: llama-perplexity scores the second half of each chunk"
            )
        self.path = Path(model)
        if not self.path.is_file():
            raise EvaluationError(f"{self.path}: GGUF file not found")
        self.ctx = ctx
        settings = settings or RunnerSettings()
        self.settings = settings
        self.n_seq = settings.n_seq(ctx)
        quiet_llama()
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = settings.n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise EvaluationError(
                f"{self.path}: llama.cpp could not load this GGUF (run with -v for its log)"
            )
        self._ctx = None
        self._batch = None
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
            self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
            if llama_cpp.llama_vocab_get_add_eos(self._vocab):
                # ref: perplexity.cpp GGML_ASSERT(!llama_vocab_get_add_eos(vocab))
                raise EvaluationError(
                    f"{self.path}: the vocab adds EOS to every text; llama-perplexity refuses such models"
                )
            self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
            n_ctx_total = self.n_seq * ctx
            self.n_batch = min(
                settings.n_batch, n_ctx_total
            )  # ref: llama_perplexity() params.n_batch = min(...)
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx = n_ctx_total
            cp.n_batch = self.n_batch
            cp.n_ubatch = settings.n_ubatch
            cp.n_seq_max = self.n_seq
            cp.kv_unified = False
            cp.swa_full = False
            cp.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[settings.flash_attn]
            cp.type_k = _KV_TYPES[settings.type_k]
            cp.type_v = _KV_TYPES[settings.type_v]
            if settings.n_threads is not None:
                cp.n_threads = settings.n_threads
                cp.n_threads_batch = settings.n_threads
            self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
            if not self._ctx:
                raise EvaluationError(
                    f"{self.path}: llama.cpp could not create a context of {n_ctx_total} tokens"
                )
            self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str) -> np.ndarray:
        """Whole text, BOS added when the vocab asks for it, special tokens not parsed.
        ref: perplexity.cpp `common_tokenize(ctx, params.prompt, true)` (parse_special=false)"""
        import llama_cpp

        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, True, False)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, True, False)
        if n < 0:
            raise EvaluationError(f"{self.path}: tokenization failed ({n})")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def _decode(self, entries: list[tuple[np.ndarray, int, int]], first: int) -> np.ndarray:
        """Decode (tokens, start position, seq id) runs as one batch; return the logits of
        all outputs (positions >= first) in batch order as a view valid until the next decode."""
        import llama_cpp

        b = self._batch
        n = 0
        n_out = 0
        for toks, pos0, seq in entries:
            for k, t in enumerate(toks.tolist()):
                pos = pos0 + k
                b.token[n] = t
                b.pos[n] = pos
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                out = pos >= first
                b.logits[n] = out
                n_out += out
                n += 1
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise EvaluationError(
                f"{self.path}: llama_decode failed with code {rc} on a batch of {n} tokens"
            )
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def chunk_logits(self, chunks: Mapping[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (chunk id, logits [ctx-1-ctx/2, vocab]) for each chunk, in chunk order.

        `chunks` maps a chunk id i to its ctx corpus tokens (tokens[i*ctx:(i+1)*ctx]).
        Chunks are grouped as llama-perplexity groups them (i, i+1, .., i+n_seq-1 with i a
        multiple of n_seq), so a range that starts on a multiple of n_seq gives the same
        logits as a run over the whole corpus. The yielded array is a view into llama.cpp's
        buffer, valid until the next iteration.
        """
        import llama_cpp

        ctx, first = self.ctx, self.ctx // 2
        n_scored = ctx - 1 - first
        ids = sorted(chunks)
        while ids:
            group_start = ids[0] - ids[0] % self.n_seq
            group = [i for i in ids if i < group_start + self.n_seq]
            ids = ids[len(group) :]
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
            chunk_toks = []
            for i in group:
                t = np.array(chunks[i], dtype=np.int32)
                if len(t) != ctx:
                    raise EvaluationError(f"chunk {i} has {len(t)} tokens, expected {ctx}")
                if (
                    self.add_bos
                ):  # ref: perplexity.cpp "add BOS token for the first batch of each chunk"
                    t[0] = self.bos
                chunk_toks.append(t)
            if self.n_batch >= ctx:
                out = self._decode([(t, 0, s) for s, t in enumerate(chunk_toks)], first)
                per = ctx - first
                for s, i in enumerate(group):
                    yield i, out[s * per : s * per + n_scored]
            else:
                (t,) = chunk_toks  # n_seq is 1 when n_batch < ctx
                parts = []
                for j in range(0, ctx, self.n_batch):
                    o = self._decode([(t[j : j + self.n_batch], j, 0)], first)
                    if len(o):
                        parts.append(o.copy())
                yield group[0], np.concatenate(parts)[:n_scored]
