"""The base records as llama-perplexity's `--kl-divergence-base` file."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qatgguf.errors import EvaluationError
from qatgguf.evaluate.records import LLAMACPP_MAGIC, BaseRecords
from qatgguf.files import atomic_output


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
