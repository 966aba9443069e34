"""QAT grid recovery for 8-bit grids, written as Q8_0 (`x = d * q`, codes -127..127).

A QAT int8 checkpoint stores, per block of 32, `w_i = bf16(s * k_i)`. ggml's reference
Q8_0 recomputes `d = amax / 127` and rounds every weight again, so unless the block
maximum carries the code 127 the codes change. Here, per block (the same steps as the
4-bit search in `lattice.py`, with the codes of an int8 grid):

1. the max-|w| element carries the largest |k| = m: for m = 127 down to 1, the scale lies
   in the bf16 rounding interval of amax divided by m;
2. for each fp16 value c in that interval, look for codes with bf16(c * k_i) == w_i for
   every i (c * k_i is exact in float32: 11 + 7 significant bits); k_i = 0 only where
   w_i = 0. bf16 keeps 8 significant bits, so w_i / c may sit up to a whole code away
   from k_i: rint(w_i / c) and its two neighbours are tried;
3. a bf16-valued c wins (a bf16 QAT scale is then recovered exactly), else the first c
   found; without any, try the next m;
4. a block with no grid gets ggml's reference encoding.

Several m can fit one block (the grid s/2 with codes 2k reproduces the grid s): the first
one found, the finest, decodes to values whose bf16 rounding is the checkpoint's.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from qatgguf.quant._fp import F32, bits_f32, f32_bits, fp16_to_fp32, fp32_to_fp16, nearest_int
from qatgguf.quant.legacy import q8_0_quantize

if TYPE_CHECKING:
    from qatgguf.quant.lattice import GridStats

_ABS = np.uint32(0x7FFFFFFF)
_EXP_ALL = np.uint32(0x7F800000)
_WIDEN_LO = F32(1.0 - 2.0**-20)
_WIDEN_HI = F32(1.0 + 2.0**-20)
QMAX = 127
BLOCK = 32
TYPE_SIZE = 34

# hist slots: 0..254 = code of the max element + 127; 255 = blocks on a grid with an
# exact fp16 scale; 256 = of those, with a bf16-valued scale
H_EXACT = 2 * QMAX + 1
H_BF16 = H_EXACT + 1
H_SIZE = H_BF16 + 1


@njit(cache=True, nogil=True, inline="always")
def _bf16_of(v: float) -> np.uint32:
    """Upper 16 bits of bf16(v), round to nearest even (v finite)."""
    u = f32_bits(v)
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(cache=True, nogil=True)
def _fit(x: np.ndarray, xu: np.ndarray, b: int, c: float, k: np.ndarray) -> bool:
    """Codes k of the block at b with bf16(c * k_j) == w_j for every j, if there are any.
    With codes up to 127 the bf16 rounding of w (up to 2**-8 relative) can move w / c by
    more than half a code, so the neighbours of rint(w / c) are tried too."""
    inv = F32(1.0) / c
    for j in range(BLOCK):
        u = xu[b + j] & _ABS
        if u == 0:
            k[j] = 0
            continue
        want = u >> np.uint32(16)
        k0 = nearest_int(abs(x[b + j]) * inv)
        hit = 0
        for kk in (k0, k0 - 1, k0 + 1):
            if 0 < kk <= QMAX and _bf16_of(c * F32(kk)) == want:
                hit = kk
                break
        if hit == 0:
            return False
        k[j] = hit if x[b + j] > F32(0.0) else -hit
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def grid_q8_0_blocks(x: np.ndarray, out: np.ndarray, hist: np.ndarray) -> None:
    """Encode flat float32 blocks `x` into Q8_0 bytes `out`, keeping each block's grid."""
    xu = x.view(np.uint32)
    nb = x.size // BLOCK
    k = np.empty(BLOCK, np.int64)
    for i in range(nb):
        b = i * BLOCK
        o = i * TYPE_SIZE
        low = np.uint32(0)
        mbits = np.uint32(0)
        for j in range(BLOCK):
            u = xu[b + j]
            low |= u
            mbits = max(mbits, u & _ABS)
        best = -1
        if (low & np.uint32(0xFFFF)) == 0 and mbits > 0 and mbits < _EXP_ALL:
            # the bf16 rounding interval of the largest magnitude (midpoints to its
            # neighbours, exact in f32): amax = bf16(c * m) puts c in that interval / m
            a_lo = bits_f32(np.uint32(mbits - np.uint32(0x8000)))
            a_hi = bits_f32(np.uint32(mbits + np.uint32(0x8000)))
            for m in range(QMAX, 0, -1):
                lo_b = a_lo / F32(m) * _WIDEN_LO
                hi_b = a_hi / F32(m) * _WIDEN_HI
                h = np.int64(fp32_to_fp16(lo_b))
                if h > 1 and fp16_to_fp32(np.uint16(h)) > lo_b:
                    h -= 1  # fp16 rounding went up past the bound
                first = -1
                for _ in range(64):
                    if h >= 0x7C00:
                        break
                    c = fp16_to_fp32(np.uint16(h))
                    if c > hi_b:
                        break
                    if c > F32(0.0) and _fit(x, xu, b, c, k):
                        if first < 0:
                            first = h
                        if (f32_bits(c) & np.uint32(0xFFFF)) == 0:
                            best = h  # a bf16-valued scale: the QAT scale itself
                            break
                    h += 1
                if best < 0 and first >= 0:
                    best = first
                if best >= 0:
                    break
        if best < 0:
            q8_0_quantize(x[b : b + BLOCK], out[o : o + TYPE_SIZE])
            continue
        c = fp16_to_fp32(np.uint16(best))
        _fit(x, xu, b, c, k)
        hist[H_EXACT] += 1
        if (f32_bits(c) & np.uint32(0xFFFF)) == 0:
            hist[H_BF16] += 1
        imx = 0
        while (xu[b + imx] & _ABS) != mbits:
            imx += 1
        hist[k[imx] + QMAX] += 1
        out[o] = np.uint8(best & 0xFF)
        out[o + 1] = np.uint8(best >> 8)
        for j in range(BLOCK):
            out[o + 2 + j] = np.uint8(k[j] & 0xFF)


class Q8GridEncoder:
    """Grid-aligned Q8_0 encoder for one tensor, fed in row chunks (the interface of
    `lattice.GridEncoder`: `encode`, then `finish`). Each block's scale is decided within
    the block, so `finish` writes nothing."""

    block = BLOCK
    type_size = TYPE_SIZE

    def __init__(self, *, name: str | None = None) -> None:
        from gguf import GGMLQuantizationType as T

        from qatgguf.quant.lattice import GridStats

        self.qtype = T.Q8_0
        self.name = name
        self.stats = GridStats()
        self._pos = 0
        self._lock = threading.Lock()

    def encode(self, x: np.ndarray, out: np.ndarray, *, pos: int | None = None) -> None:
        nb = x.size // BLOCK
        hist = np.zeros(H_SIZE, np.int64)
        grid_q8_0_blocks(x, out, hist)
        with self._lock:
            self._pos = (self._pos if pos is None else pos) + nb * TYPE_SIZE
            self.stats.blocks += int(nb)
            self.stats.on_grid += int(hist[H_EXACT])
            self.stats.exact_scale += int(hist[H_EXACT])
            self.stats.bf16_scale += int(hist[H_BF16])
            for c in np.flatnonzero(hist[:H_EXACT]).tolist():
                code = c - QMAX
                self.stats.max_codes[code] = self.stats.max_codes.get(code, 0) + int(hist[c])

    def finish(self, out: np.ndarray) -> GridStats:
        return self.stats
