"""QAT grid recovery: keep the integer grid a quantization-aware-trained checkpoint was
trained on, instead of recomputing scales.

A QAT int-k checkpoint stores, per block, `w_i = bf16(s * k_i)` with integer codes k_i
and one scale s. The reference quantizers re-derive the scale from the block maximum,
which re-rounds every code unless the maximum happens to carry the extreme code. Here,
per block (ref: docs/DESIGN.md, "QAT grid recovery"; the formats: ggml/src/ggml-quants.c
quantize_row_q4_0_ref, quantize_row_tq2_0_ref):

1. the max-|w| element carries the largest |k| = m; try s = amax/m for m from the
   largest code magnitude down (finest grid first);
2. k_i = rint(w_i / s); k_i = 0 only where w_i = 0; the codes must fit the format in
   one of the two orientations (d = +s or d = -s);
3. every w_i bounds s to the bf16 rounding interval of w_i divided by |k_i|; the
   intersection [S_lo, S_hi] must be non-empty;
4. among the fp16 values c in [S_lo, S_hi], keep those with bf16(c * k_i) == w_i for
   every i (exact; c * k_i is exact in float32), and take the one closest to the least-
   squares scale; when >= 99% of a tensor's grid blocks admit a bf16-valued c, the
   scales were bf16 in training and the bf16 candidate is taken (recovering s exactly);
5. a block with no grid gets ggml's reference encoding.

Q4_0 holds codes [-8, 7] (d > 0) or [-7, 8] (d < 0); TQ2_0 holds [-1, 2]*d, so the
2-bit grids {-2,-1,0,1}*s (d = -s) and {-1,0,1,2}*s (d = +s) both fit exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as T

from qatgguf.errors import QuantizationError
from qatgguf.quant.grid_kernels import H_BF16, H_EXACT, H_SIZE, apply_bf16, grid_q4_0, grid_tq2_0

BF16_PREFERENCE = 0.99  # share of grid blocks with a bf16 candidate that marks bf16 QAT scales

# (block, bytes, lowest code, highest code, largest |k| tried, offset of d)
_FORMATS: dict[T, tuple[int, int, int, int, int, int]] = {
    T.Q4_0: (32, 18, -8, 7, 8, 0),
    T.TQ2_0: (256, 66, -1, 2, 2, 64),
}


@dataclass
class GridStats:
    """What the grid search found over a tensor."""

    blocks: int = 0
    on_grid: int = 0
    exact_scale: int = 0  # grid blocks with an fp16 scale that reproduces every weight
    bf16_scale: int = 0  # grid blocks with a bf16-valued such scale
    max_codes: dict[int, int] = field(
        default_factory=dict
    )  # signed code of the max element -> blocks

    @property
    def fraction(self) -> float:
        return self.on_grid / self.blocks if self.blocks else 0.0

    def add(self, nblocks: int, hist: np.ndarray) -> None:
        """Count one encoded chunk: `nblocks` blocks and the kernel's histogram."""
        self.blocks += int(nblocks)
        self.on_grid += int(hist[:H_EXACT].sum())
        self.exact_scale += int(hist[H_EXACT])
        self.bf16_scale += int(hist[H_BF16])
        for c in np.flatnonzero(hist[:H_EXACT]).tolist():
            self.max_codes[c - 16] = self.max_codes.get(c - 16, 0) + int(hist[c])

    def scale_rounding(self) -> str:
        """bf16, f16 or f32: the precision the QAT scales had, as far as the data shows."""
        if not self.on_grid:
            return "none"
        if self.bf16_scale >= BF16_PREFERENCE * self.on_grid:
            return "bf16"
        if self.exact_scale >= 0.999 * self.on_grid:
            return "f16"
        return "f32"


class GridEncoder:
    """Grid-aligned encoder for one tensor, fed in row chunks, then `finish`ed.

    The scale choice depends on the whole tensor (bf16 scales or not), so the codes are
    written chunk by chunk and the per-block scales once at the end.
    """

    def __init__(self, qtype: T, *, name: str | None = None) -> None:
        if qtype not in _FORMATS:
            raise QuantizationError(
                f"{'tensor ' + repr(name) + ': ' if name else ''}grid='qat' supports "
                f"{', '.join(t.name for t in _FORMATS)}; got {qtype.name}. Fix: use one of those types "
                f"or grid=None"
            )
        self.qtype = qtype
        self.block, self.type_size, _, _, _, self.doff = _FORMATS[qtype]
        _, _, self.kmin, self.kmax, self.mtop, _ = _FORMATS[qtype]
        self.stats = GridStats()
        self._parts: list[tuple[int, np.ndarray]] = []  # (byte offset, bf16 alternatives)
        self._pos = 0
        self._lock = threading.Lock()

    def encode(self, x: np.ndarray, out: np.ndarray, *, pos: int | None = None) -> bool:
        """Encode flat float32 blocks `x` into flat bytes `out`: the tensor's bytes from
        offset `pos`, or, without it, the chunk after the previous one. Threads may encode
        chunks at once when each gives its `pos`. Returns False when `x` holds NaN or Inf
        (those blocks get the reference encoding)."""
        nb = x.size // self.block
        alt = np.empty(nb, np.uint16)
        hist = np.zeros(H_SIZE, np.int64)
        finite = (grid_q4_0 if self.qtype == T.Q4_0 else grid_tq2_0)(x, out, alt, hist)
        with self._lock:
            if pos is None:
                pos = self._pos
            self._pos = pos + nb * self.type_size
            self.stats.add(nb, hist)
            if hist[H_BF16]:
                self._parts.append((pos, alt))
        return bool(finite)

    def finish(self, out: np.ndarray) -> GridStats:
        """Write the scales of all grid blocks into `out` (the whole tensor, flat)."""
        if self.stats.scale_rounding() == "bf16":
            for pos, alt in self._parts:
                apply_bf16(
                    out[pos : pos + alt.size * self.type_size], alt, self.type_size, self.doff
                )
        self._parts.clear()
        return self.stats


# The grid types, coarsest first: a 2-bit grid is also a 4-bit and an 8-bit grid, and a
# 4-bit grid an 8-bit one, so detection takes the first that fits.
GRID_TYPES: tuple[T, ...] = (T.TQ2_0, T.Q4_0, T.Q8_0)
# Share of a tensor's blocks that must sit on a grid for detection to choose it: the rest
# (all-zero or off-grid blocks) get the reference encoding of that type.
MIN_GRID_SHARE = 0.99


def grid_encoder(qtype: T, *, name: str | None = None) -> GridEncoder:
    """The grid-aligned encoder of `qtype` (Q4_0, TQ2_0 or Q8_0).

    Raises QuantizationError for any other type, naming the tensor."""
    if qtype == T.Q8_0:
        from qatgguf.quant.grid8 import Q8GridEncoder

        return Q8GridEncoder(name=name)  # type: ignore[return-value]  # same interface
    if qtype not in _FORMATS:
        raise QuantizationError(
            f"{'tensor ' + repr(name) + ': ' if name else ''}grid='qat' supports "
            f"{', '.join(t.name for t in GRID_TYPES)}; got {qtype.name}. Fix: use one of those "
            f"types or grid=None"
        )
    return GridEncoder(qtype, name=name)


def scan_grid(x: np.ndarray, qtype: T | str = T.Q4_0) -> GridStats:
    """Grid statistics of float rows `x` (..., n) for Q4_0, TQ2_0 or Q8_0, without keeping
    output."""
    from qatgguf.quant.api import CHUNK_ELEMENTS, resolve_type

    t = resolve_type(qtype)
    enc = grid_encoder(t)
    flat = np.asarray(x).reshape(-1)
    usable = flat.size // enc.block * enc.block
    step = max(enc.block, CHUNK_ELEMENTS // enc.block * enc.block)
    for p in range(0, usable, step):
        c = np.ascontiguousarray(flat[p : min(usable, p + step)], dtype=np.float32)
        buf = np.empty(c.size // enc.block * enc.type_size, np.uint8)
        enc.encode(c, buf)
    return enc.stats


@dataclass(frozen=True)
class GridDetection:
    """What detection found on one tensor: the share of blocks on each grid it scanned
    (types whose block does not divide the row are absent) and the chosen grid type."""

    shares: dict[str, float]
    qtype: str | None  # the coarsest grid holding >= MIN_GRID_SHARE of the blocks

    @property
    def found(self) -> bool:
        return self.qtype is not None


def detect_grid_rows(
    rows: Callable[[], Iterable[np.ndarray]],
    *,
    n: int,
    candidates: Sequence[T | str] = GRID_TYPES,
    min_share: float = MIN_GRID_SHARE,
) -> GridDetection:
    """The QAT grid of a tensor whose rows (length `n`) `rows()` yields as float blocks, a
    pass per candidate: the first of `candidates` (coarsest first) whose grid holds at
    least `min_share` of the blocks, or none. Scans stop at the first grid that fits.
    This is what `grid: auto` recipes and `qatgguf lattice` use.

    Raises UnknownQuantTypeError / QuantizationError for a candidate without a grid."""
    from qatgguf.quant.api import resolve_type

    shares: dict[str, float] = {}
    for cand in candidates:
        t = resolve_type(cand)
        enc = grid_encoder(t)  # rejects a type without a grid encoder, whatever the row
        if n <= 0 or n % enc.block:
            continue
        for block in rows():
            c = np.ascontiguousarray(block, dtype=np.float32).reshape(-1)
            enc.encode(c, np.empty(c.size // enc.block * enc.type_size, np.uint8))
        shares[t.name] = enc.stats.fraction
        if enc.stats.fraction >= min_share:
            return GridDetection(shares, t.name)
    return GridDetection(shares, None)


def detect_grid(
    x: np.ndarray, *, candidates: Sequence[T | str] = GRID_TYPES, min_share: float = MIN_GRID_SHARE
) -> GridDetection:
    """`detect_grid_rows` over the float rows `x` (..., n), in chunks."""
    from qatgguf.quant.api import CHUNK_ELEMENTS

    arr = np.asarray(x)
    n = int(arr.shape[-1]) if arr.ndim else 0
    flat = arr.reshape(-1, n) if n else arr.reshape(-1, 1)
    step = max(1, CHUNK_ELEMENTS // max(n, 1))

    def rows() -> Iterator[np.ndarray]:
        for r in range(0, flat.shape[0], step):
            yield flat[r : r + step]

    return detect_grid_rows(rows, n=n, candidates=candidates, min_share=min_share)


def block_exactness(w: np.ndarray, data: np.ndarray, qtype: T | str, *, block: int = 32) -> tuple[int, int]:
    """(exact, total) blocks of `block` consecutive row elements: a block is exact when
    the bf16 rounding of the decoded values `data` (GGML bytes of `qtype`) equals the
    checkpoint's values `w` (bf16-valued float rows of the same shape). Blocks are counted
    in units of 32 whatever the type, so files of different types compare block for block.

    Raises QuantizationError when the shapes disagree."""
    from qatgguf.quant.api import dequantize

    x = np.asarray(w, dtype=np.float32)
    deq = dequantize(data, qtype)
    if deq.size != x.size or x.shape[-1] % block:
        raise QuantizationError(
            f"decoded {deq.size} values for a tensor of shape {list(x.shape)} (rows must be a "
            f"multiple of {block}); pass the tensor the bytes were made from"
        )
    u = deq.reshape(-1).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    # compare values, not bits: a signed zero decodes to either zero
    ok = (r == x.reshape(-1)).reshape(-1, block).all(axis=1)
    return int(ok.sum()), int(ok.size)


# ------------------------------------------------------------------ recipe signature


