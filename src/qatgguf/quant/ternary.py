"""Ternary super-block format TQ2_0 (256 elements, 2-bit codes, one f16 scale at the end).

ref: ggml-quants.c quantize_row_tq2_0_ref / dequantize_row_tq2_0
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from qatgguf.quant._fp import F32, bits_f32, fp16_to_fp32, fp32_to_fp16, imax, roundf
from qatgguf.quant.registry import BlockQuant

_INF = F32(np.inf)
_LONG_LIMIT = F32(2.0**63)
_ABS = np.uint32(0x7FFFFFFF)
_EXP_ALL = np.uint32(0x7F800000)  # magnitude bits at or above: Inf or NaN


@njit(cache=True, nogil=True, inline="always")
def _lroundf(v: float) -> int:
    # glibc lroundf on x86-64 returns LONG_MIN for NaN, Inf and out-of-range input
    if abs(v) < _LONG_LIMIT:
        return np.int64(roundf(v))
    return np.int64(-9223372036854775807 - 1)


@njit(cache=True, nogil=True)
def tq2_0_blocks(x: np.ndarray, out: np.ndarray, i0: int, i1: int) -> bool:
    # ref: ggml-quants.c quantize_row_tq2_0_ref (blocks i0..i1-1). amax = MAX(|x|, amax)
    # is, for finite floats, the integer max of the magnitude bits; returns False when a
    # block holds NaN or Inf
    xu = x.view(np.uint32)
    seen = np.uint32(0)
    for i in range(i0, i1):
        xb = i * 256
        o = i * 66
        mb = np.uint32(0)
        for j in range(256):
            a = xu[xb + j] & _ABS
            mb = imax(mb, a)
        seen = imax(seen, mb)
        d = bits_f32(np.uint32(mb))
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        h = fp32_to_fp16(d)
        out[o + 64] = h & 0xFF
        out[o + 65] = (h >> 8) & 0xFF
        fast = abs(inv) < _INF
        for j in range(2):
            base = xb + 128 * j
            for m in range(32):
                q = 0
                for n in range(4):
                    v = x[base + m + 32 * n] * inv
                    if fast:
                        xi = np.int64(roundf(v)) + 1
                    else:
                        xi = _lroundf(v) + 1
                    q += (xi & 3) << (2 * n)
                out[o + 32 * j + m] = q & 0xFF
    return seen < _EXP_ALL


@njit(cache=True, nogil=True)
def _tq2_0_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    return tq2_0_blocks(x, out, 0, x.size // 256)


@njit(cache=True, nogil=True)
def _tq2_0_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    nb = y.size // 256
    for i in range(nb):
        o = i * 66
        d = fp16_to_fp32(np.uint16(data[o + 64]) | (np.uint16(data[o + 65]) << np.uint16(8)))
        yo = i * 256
        for j in range(2):
            for n in range(4):
                for m in range(32):
                    q = (data[o + 32 * j + m] >> (2 * n)) & 3
                    y[yo + 128 * j + 32 * n + m] = F32(np.int32(q) - 1) * d


class TQ2_0(BlockQuant, qtype=T.TQ2_0):
    checks_finite = True
    quantize_blocks = staticmethod(_tq2_0_quantize)
    dequantize_blocks = staticmethod(_tq2_0_dequantize)
