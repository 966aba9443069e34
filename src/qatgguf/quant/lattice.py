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
from numba import njit

from qatgguf.errors import QuantizationError
from qatgguf.quant._fp import (
    F32,
    MAGIC_NEAREST,
    bits_f32,
    f32_bits,
    fp16_to_fp32,
    fp32_to_fp16,
    imax,
    imin,
    nearest_int,
)
from qatgguf.quant.legacy import q4_0_blocks
from qatgguf.quant.ternary import tq2_0_blocks

_NO_CAND = 0xFFFF
_WIDEN_LO = F32(1.0 - 2.0**-20)
_WIDEN_HI = F32(1.0 + 2.0**-20)
_F32_INF = F32(np.inf)
_ABS = np.uint32(0x7FFFFFFF)
_EXP_ALL = np.uint32(0x7F800000)  # magnitude bits of +Inf
BF16_PREFERENCE = 0.99  # share of grid blocks with a bf16 candidate that marks bf16 QAT scales

# (block, bytes, lowest code, highest code, largest |k| tried, offset of d)
_FORMATS: dict[T, tuple[int, int, int, int, int, int]] = {
    T.Q4_0: (32, 18, -8, 7, 8, 0),
    T.TQ2_0: (256, 66, -1, 2, 2, 64),
}


# hist slots: 0..32 = signed code of the max element + 16; 33 = grid blocks with an exact
# fp16 scale; 34 = grid blocks with a bf16-valued exact scale
_H_EXACT = 33
_H_BF16 = 34
_H_SIZE = 35


@njit(cache=True, nogil=True, inline="always")
def _scan_codes(
    x: np.ndarray,
    xu: np.ndarray,
    b: int,
    j0: int,
    j1: int,
    inv_s: float,
    k: np.ndarray,
    kf: np.ndarray,
    bad: bool,
    kl: int,
    kh: int,
    lo_bits: int,
    hi_bits: int,
) -> tuple[bool, int, int, int, int]:
    """Codes k[j] = rint(w_j / s) (and kf[j] = |k[j]| as float32) for j in [j0, j1) of the
    block at b, folded into the running verdict: `bad` (a nonzero weight with code 0), the
    code range [kl, kh] and the intersection of the scale intervals, as float32 bits
    [lo_bits, hi_bits]."""
    for j in range(j0, j1):
        u = xu[b + j] & _ABS
        ki = nearest_int(x[b + j] * inv_s)
        k[j] = ki
        nz = u != np.uint32(0)
        bad |= nz & (ki == 0)
        # zero weights have k = 0, inside every [kl, kh]
        kl = imin(kl, ki)
        kh = imax(kh, ki)
        # |k| as a float from float operations (numba's int64 -> float cast does not
        # vectorize): y + 1.5*2**23 rounds y to an integer as nearest_int does, since
        # |y| <= 8 (|w| <= amax = m*s) for a finite 1/s; an infinite one (s underflowed)
        # gives codes far outside every range, and the scale is rejected
        ka = abs((x[b + j] * inv_s + MAGIC_NEAREST) - MAGIC_NEAREST)
        kf[j] = ka
        # bf16 rounding interval of |w| (midpoints to the neighbours, exact in f32) / |k|;
        # a reciprocal product is within 2 ulps, far inside the 2**-20 margin the caller
        # uses. 1/|k| in float32 equals the rounded double 1/|k| for |k| <= 16; the bounds
        # are >= 0, so their max/min is the integer max/min of their bits
        r = F32(1.0) / max(ka, F32(1.0))
        lo = f32_bits(bits_f32(np.uint32(u - np.uint32(0x8000))) * r)
        hi = f32_bits(bits_f32(np.uint32(u + np.uint32(0x8000))) * r)
        lo_bits = imax(lo_bits, lo if nz else np.uint32(0))
        hi_bits = imin(hi_bits, hi if nz else _EXP_ALL)
    return bad, kl, kh, lo_bits, hi_bits


@njit(cache=True, nogil=True, error_model="numpy")
def _grid_blocks(
    x: np.ndarray,
    out: np.ndarray,
    alt: np.ndarray,
    hist: np.ndarray,
    bs: int,
    ts: int,
    kmin: int,
    kmax: int,
    mtop: int,
    doff: int,
) -> bool:
    """Encode blocks with their grid, one pass, no temporaries beyond one block of codes.

    Each grid block gets its codes and the fp16 scale closest to the least-squares one
    (written now); `alt` keeps the signed bf16-valued alternative (`_NO_CAND`: none) that
    `_apply_bf16` writes when the whole tensor turns out to have bf16 scales. Blocks
    without a grid get the reference encoding and `alt = _NO_CAND`. Returns False when a
    block holds NaN or Inf.
    """
    xu = x.view(np.uint32)
    nb = x.size // bs
    k = np.empty(bs, np.int32)
    kf = np.empty(bs, np.float32)  # |k| as float32
    shift = np.uint64(5 if bs == 32 else 8)  # log2(bs): room for an index below the bits
    finite = True
    for i in range(nb):
        b = i * bs
        o = i * ts
        alt[i] = _NO_CAND
        # a bf16 block (low halves zero) with a finite, nonzero largest magnitude; for
        # finite floats the magnitude order is the integer order of the bits without sign,
        # and with bs-1-j below them one integer max (vectorized) also finds where the
        # largest magnitude first occurs
        low = np.uint32(0)
        km = np.uint64(0)
        for j in range(bs):
            u = xu[b + j]
            low |= u
            key = (np.uint64(u & _ABS) << shift) | np.uint64(bs - 1 - j)
            km = key if key > km else km  # noqa: FURB136 (a select; max() branches)
        mbits = np.uint32(km >> shift)
        imx = bs - 1 - np.int64(km & np.uint64(bs - 1))
        finite &= mbits < _EXP_ALL
        found = (low & np.uint32(0xFFFF)) == 0 and mbits > 0 and mbits < _EXP_ALL
        m = 0
        sign = 0
        s_lo = F32(0.0)
        s_hi = F32(0.0)
        s_ls = F32(0.0)
        amax = bits_f32(np.uint32(mbits))
        if found:
            for mm in range(mtop, 0, -1):
                s = amax / F32(mm)
                # grid weights sit within a bf16 half-ulp of an integer multiple of s, far
                # from the .5 boundaries, so the reciprocal product gives the same k as a division
                inv_s = F32(1.0) / s
                # One branch-free pass (it vectorizes); the verdict equals stopping at the
                # first failing element, since `bad` sticks and the bounds only tighten.
                # The first 8 weights go first: they alone reject most wrong scales (and
                # plain weights) at a quarter of the cost.
                bad, kl, kh, lo_bits, hi_bits = _scan_codes(
                    x, xu, b, 0, 8, inv_s, k, kf, False, 0, 0, np.uint32(0), _EXP_ALL
                )
                if (
                    bad
                    or kh - kl > kmax - kmin
                    or bits_f32(np.uint32(lo_bits)) > bits_f32(np.uint32(hi_bits)) * _WIDEN_HI
                ):
                    continue
                bad, kl, kh, lo_bits, hi_bits = _scan_codes(
                    x, xu, b, 8, bs, inv_s, k, kf, bad, kl, kh, lo_bits, hi_bits
                )
                lo_max = bits_f32(np.uint32(lo_bits))
                hi_min = bits_f32(np.uint32(hi_bits))
                if bad or lo_max > hi_min * _WIDEN_HI:
                    continue
                if kl >= kmin and kh <= kmax:
                    sign = 1
                elif -kh >= kmin and -kl <= kmax:
                    sign = -1
                else:
                    continue
                # On a grid every |w| lies within a factor ~8.07 (Q4_0; ~2.02 for TQ2_0) of
                # the largest, so all |w|*|k| are multiples of one power of two and the
                # whole sum needs at most 21 significant bits: every float32 partial sum is
                # exact and any summation order gives C's sequential result. Eight
                # independent partial sums let the adds overlap.
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = F32(0.0)
                sum_kk = F32(0.0)  # at most 256 * 8**2: exact in float32
                for j in range(0, bs, 8):
                    a0 += abs(x[b + j]) * kf[j]
                    a1 += abs(x[b + j + 1]) * kf[j + 1]
                    a2 += abs(x[b + j + 2]) * kf[j + 2]
                    a3 += abs(x[b + j + 3]) * kf[j + 3]
                    a4 += abs(x[b + j + 4]) * kf[j + 4]
                    a5 += abs(x[b + j + 5]) * kf[j + 5]
                    a6 += abs(x[b + j + 6]) * kf[j + 6]
                    a7 += abs(x[b + j + 7]) * kf[j + 7]
                for j in range(bs):
                    sum_kk += kf[j] * kf[j]
                sum_wk = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
                s_ls = sum_wk / sum_kk
                s_lo = lo_max
                s_hi = hi_min
                m = mm
                break
        if m == 0:
            if bs == 32:
                q4_0_blocks(x, out, i, i + 1)
            else:
                tq2_0_blocks(x, out, i, i + 1)
            continue
        # every fp16 value c in [s_lo, s_hi] (widened by the rounding margin) whose products
        # bf16(c*|k_i|) give back every |w_i|; the closest to s_ls, and the closest bf16-valued
        lo_b = s_lo * _WIDEN_LO
        hi_b = s_hi * _WIDEN_HI
        in_lo = s_lo * _WIDEN_HI
        in_hi = s_hi * _WIDEN_LO
        h = np.int64(fp32_to_fp16(lo_b))
        if h > 1 and fp16_to_fp32(np.uint16(h)) > lo_b:
            h -= 1
        best_any = -1
        best_any_dist = _F32_INF
        best_bf = -1
        best_bf_dist = _F32_INF
        for _ in range(64):
            if h >= 0x7C00:
                break
            c = fp16_to_fp32(np.uint16(h))
            if c > hi_b:
                break
            # Below lo_b (the widened lower bound) no c is exact: the bound of the element
            # that sets s_lo is within 2**-22 of its true value, and c*|k| would round
            # below |w| there. Skipping that first candidate saves a whole-block check.
            if c > F32(0.0) and c >= lo_b:
                # strictly inside every interval (beyond the rounding margin): exact without
                # looking; near an end, check bf16(c*|k_i|) == |w_i| element by element
                exact = True
                if not (c > in_lo and c < in_hi):
                    for j in range(bs):
                        u = xu[b + j] & np.uint32(0x7FFFFFFF)
                        v = f32_bits(c * kf[j])
                        r16 = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> (
                            np.uint32(16)
                        )
                        exact &= (u == 0) | (r16 == (u >> np.uint32(16)))
                if exact:
                    dist = abs(c - s_ls)
                    if dist < best_any_dist:
                        best_any_dist = dist
                        best_any = h
                    if (f32_bits(c) & np.uint32(0xFFFF)) == 0 and dist < best_bf_dist:
                        best_bf_dist = dist
                        best_bf = h
            h += 1
        hs = 0x8000 if sign < 0 else 0
        if best_any < 0:
            hl = np.int64(fp32_to_fp16(s_ls))
            if hl == 0 or hl >= 0x7C00:
                # scale outside fp16: the reference encoding it is
                if bs == 32:
                    q4_0_blocks(x, out, i, i + 1)
                else:
                    tq2_0_blocks(x, out, i, i + 1)
                continue
            best_any = hl
        else:
            hist[_H_EXACT] += 1
        if best_bf >= 0:
            hist[_H_BF16] += 1
            alt[i] = np.uint16(best_bf | hs)
        hist[k[imx] + 16] += 1
        hd = best_any | hs
        out[o + doff] = np.uint8(hd & 0xFF)
        out[o + doff + 1] = np.uint8(hd >> 8)
        if bs == 32:
            for j in range(16):
                q0 = sign * k[j] - kmin
                q1 = sign * k[j + 16] - kmin
                out[o + 2 + j] = np.uint8(q0 | (q1 << 4))
        else:
            for jj in range(2):
                for mm in range(32):
                    q = 0
                    for nn in range(4):
                        q |= (sign * k[128 * jj + 32 * nn + mm] - kmin) << (2 * nn)
                    out[o + 32 * jj + mm] = np.uint8(q)
    return finite


# One entry per format, so LLVM sees the block size and code range as constants when it
# inlines the body (fixed trip counts, vectorized block loops, no dead format's code).
@njit(cache=True, nogil=True)
def _grid_q4_0(x: np.ndarray, out: np.ndarray, alt: np.ndarray, hist: np.ndarray) -> bool:
    return _grid_blocks(x, out, alt, hist, 32, 18, -8, 7, 8, 0)


@njit(cache=True, nogil=True)
def _grid_tq2_0(x: np.ndarray, out: np.ndarray, alt: np.ndarray, hist: np.ndarray) -> bool:
    return _grid_blocks(x, out, alt, hist, 256, 66, -1, 2, 2, 64)


@njit(cache=True, nogil=True)
def _apply_bf16(out: np.ndarray, alt: np.ndarray, ts: int, doff: int) -> None:
    for i in range(alt.size):
        h = alt[i]
        if h != _NO_CAND:
            out[i * ts + doff] = np.uint8(h & 0xFF)
            out[i * ts + doff + 1] = np.uint8(h >> 8)


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
        self.on_grid += int(hist[:_H_EXACT].sum())
        self.exact_scale += int(hist[_H_EXACT])
        self.bf16_scale += int(hist[_H_BF16])
        for c in np.flatnonzero(hist[:_H_EXACT]).tolist():
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
        hist = np.zeros(_H_SIZE, np.int64)
        finite = (_grid_q4_0 if self.qtype == T.Q4_0 else _grid_tq2_0)(x, out, alt, hist)
        with self._lock:
            if pos is None:
                pos = self._pos
            self._pos = pos + nb * self.type_size
            self.stats.add(nb, hist)
            if hist[_H_BF16]:
                self._parts.append((pos, alt))
        return bool(finite)

    def finish(self, out: np.ndarray) -> GridStats:
        """Write the scales of all grid blocks into `out` (the whole tensor, flat)."""
        if self.stats.scale_rounding() == "bf16":
            for pos, alt in self._parts:
                _apply_bf16(
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


def recipe_signature(stats: GridStats) -> dict[str, object]:
    """Which code the block maximum maps to (share of grid blocks), the scale rounding and
    the QAT recipe those imply (ref: reference notes section 3b, recipe signature table)."""
    total = stats.on_grid
    shares = (
        {f"{c:+d}": round(n / total, 4) for c, n in sorted(stats.max_codes.items())}
        if total
        else {}
    )
    p = {c: n / total for c, n in stats.max_codes.items()} if total else {}
    neg8, pos8, pos7 = p.get(-8, 0.0), p.get(8, 0.0), p.get(7, 0.0)
    # a scale learned per block (LSQ) leaves the block maximum wherever training put it;
    # every max-derived rule puts it on +-7 or +-8
    inner = sum(v for c, v in p.items() if abs(c) <= 6)
    if not total:
        recipe = "no grid"
    elif pos8 >= 0.1 and neg8 >= 0.1:
        recipe = "Q4_0-style: s = max/-8 (the max element always gets -8 in its sign)"
    elif inner >= 0.05:
        recipe = "learned per-block scale (LSQ-style): the max element's code varies, codes [-8, 7]"
    elif neg8 + pos8 < 0.01:
        recipe = "symmetric [-7, 7]: s = amax/7"
    elif pos7 >= 0.25:
        recipe = "symmetric round: s = amax/7.5 (torchao), codes [-8, 7]"
    else:
        recipe = "fixed per-block scale, codes [-8, 7]"
    return {"max_code_shares": shares, "scale_rounding": stats.scale_rounding(), "recipe": recipe}


def grid_signature(stats: GridStats, qtype: T | str) -> dict[str, object]:
    """`recipe_signature` for a grid of any type: for Q4_0 the 4-bit recipe; for TQ2_0 the
    2-bit grid and the share of blocks that need TQ2_0's negative scale (the block's largest
    weight is negative, so the grid is {-2,-1,0,1} times a positive step); for Q8_0 the
    8-bit grid and the share of blocks whose largest weight has the code 127."""
    name = qtype if isinstance(qtype, str) else qtype.name
    if name == "Q4_0":
        return recipe_signature(stats)
    total = stats.on_grid
    shares = (
        {f"{c:+d}": round(n / total, 4) for c, n in sorted(stats.max_codes.items())}
        if total
        else {}
    )
    if not total:
        recipe = "no grid"
    elif name == "TQ2_0":
        neg = stats.max_codes.get(-2, 0) / total
        ternary = (stats.max_codes.get(-1, 0) + stats.max_codes.get(1, 0)) / total
        recipe = (
            f"2-bit grid {{-1,0,1,2}}*d: negative scale in {neg:.1%} of blocks, "
            f"ternary (codes -1..1) in {ternary:.1%}"
        )
    else:
        full = (stats.max_codes.get(127, 0) + stats.max_codes.get(-127, 0)) / total
        recipe = f"8-bit grid, codes -127..127: the largest weight has code 127 in {full:.1%} of blocks"
    return {"max_code_shares": shares, "scale_rounding": stats.scale_rounding(), "recipe": recipe}
