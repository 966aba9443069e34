"""The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each quantizer is a line-by-line port of ggml's `quantize_row_*_ref` (which
`ggml_quantize_chunk` runs when no importance matrix is given), float32 throughout, so
the bytes are identical. The C code converts floats to integers with plain casts; on
x86 those are `cvttss2si` (truncation, INT_MIN for NaN/Inf/overflow) followed by a
narrowing to the low byte. The fast path of each block uses a plain truncation, which
is the same whenever the block's inverse scale is finite; blocks whose scale is a tiny
subnormal (inverse scale = Inf) take the exact emulation.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from qatgguf.quant._fp import (
    F32,
    bits_f32,
    cvtt_i32,
    floor_small,
    fp32_to_fp16,
    get_f16,
    imax,
    imin,
    put_f16,
    roundf,
    to_i8,
)
from qatgguf.quant.registry import BlockQuant

_INF = F32(np.inf)
_ABS = np.uint32(0x7FFFFFFF)
_EXP_ALL = np.uint32(0x7F800000)  # magnitude bits at or above: Inf or NaN


# ---------------------------------------------------------------- Q4_0


@njit(cache=True, nogil=True, inline="always")
def _first_max_magnitude(x: np.ndarray, xu: np.ndarray, b: int) -> tuple[np.uint32, float]:
    """(magnitude bits, value) of the first element of largest |x| in the 32-block at b, as
    C's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from 0 keeps it (0.0 for an
    all-zero block). For finite floats the magnitude order is the integer order of the
    bits without the sign; with 31 - j below them, one integer max (vectorized, one pass)
    finds the largest magnitude and, among equals, the first."""
    km = np.uint64(0)
    for j in range(32):
        key = (np.uint64(xu[b + j] & _ABS) << np.uint64(5)) | np.uint64(31 - j)
        km = key if key > km else km  # noqa: FURB136 (a select; max() branches)
    m = np.uint32(km >> np.uint64(5))
    v = x[b + 31 - np.int64(km & np.uint64(31))]
    return m, (v if m != np.uint32(0) else F32(0.0))


@njit(cache=True, nogil=True, error_model="numpy")
def q4_0_blocks(x: np.ndarray, out: np.ndarray, i0: int, i1: int) -> bool:
    # ref: ggml-quants.c quantize_row_q4_0_ref (blocks i0..i1-1). Returns False when a
    # block holds NaN or Inf.
    xu = x.view(np.uint32)
    seen = np.uint32(0)
    for i in range(i0, i1):
        b = i * 32
        m, mx = _first_max_magnitude(x, xu, b)
        seen = imax(seen, m)
        d = mx / F32(-8.0)
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        o = i * 18
        h = fp32_to_fp16(d)
        out[o] = np.uint8(h & 0xFF)
        out[o + 1] = np.uint8(h >> 8)
        if abs(inv) < _INF:
            for j in range(16):
                # x*id lies in [-8, 8] here, so the int8 cast is a plain floor of x*id + 8.5
                xi0 = imin(np.int32(15), floor_small(x[b + j] * inv + F32(8.5)))
                xi1 = imin(np.int32(15), floor_small(x[b + 16 + j] * inv + F32(8.5)))
                out[o + 2 + j] = np.uint8(xi0 | (xi1 << np.int32(4)))
        else:
            for j in range(16):
                xi0 = min(15, to_i8(cvtt_i32(x[b + j] * inv + F32(8.5)))) & 0xFF
                xi1 = min(15, to_i8(cvtt_i32(x[b + 16 + j] * inv + F32(8.5)))) & 0xFF
                out[o + 2 + j] = (xi0 | (xi1 << 4)) & 0xFF
    return seen < _EXP_ALL


@njit(cache=True, nogil=True)
def _q4_0_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    return q4_0_blocks(x, out, 0, x.size // 32)


@njit(cache=True, nogil=True)
def _q4_0_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q4_0
    nb = y.size // 32
    for i in range(nb):
        o = i * 18
        d = get_f16(data, o)
        for j in range(16):
            q = data[o + 2 + j]
            y[i * 32 + j] = F32(np.int32(q & 0x0F) - 8) * d
            y[i * 32 + 16 + j] = F32(np.int32(q >> 4) - 8) * d


class Q4_0(BlockQuant, qtype=T.Q4_0):
    checks_finite = True
    quantize_blocks = staticmethod(_q4_0_quantize)
    dequantize_blocks = staticmethod(_q4_0_dequantize)


@njit(cache=True, nogil=True)
def _min_max_values(x: np.ndarray, b: int, kmn: np.int32, kmx: np.int32) -> tuple[float, float]:
    """(min, max) of the 32-block at b, as C's `if (v < min) min = v; if (v > max) max = v;`
    from FLT_MAX / -FLT_MAX finds them, from the smallest and largest order key.

    Float order is the signed-integer order of the key `bits ^ (sign ? 0x7FFFFFFF : 0)`,
    whose min/max vectorize. The one difference is zero: C keeps the first zero it meets
    (+0 and -0 compare equal), the key order puts -0 below +0, so a zero is re-read from
    the block.
    """
    mn = bits_f32(np.uint32(kmn ^ ((kmn >> np.int32(31)) & np.int32(0x7FFFFFFF))))
    mx = bits_f32(np.uint32(kmx ^ ((kmx >> np.int32(31)) & np.int32(0x7FFFFFFF))))
    if mn == F32(0.0) or mx == F32(0.0):
        j = 0
        while x[b + j] != F32(0.0):
            j += 1
        if mn == F32(0.0):
            mn = x[b + j]
        if mx == F32(0.0):
            mx = x[b + j]
    return mn, mx


# ---------------------------------------------------------------- Q4_1


@njit(cache=True, nogil=True)
def _q4_1_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    # ref: ggml-quants.c quantize_row_q4_1_ref; returns False when x holds NaN or Inf
    nb = x.size // 32
    xu = x.view(np.uint32)
    bad = False
    for i in range(nb):
        b = i * 32
        kmn = np.int32(0x7FFFFFFF)
        kmx = np.int32(-0x7FFFFFFF - 1)
        for j in range(32):
            u = xu[b + j]
            k = np.int32(u) ^ ((np.int32(u) >> np.int32(31)) & np.int32(0x7FFFFFFF))
            kmn = imin(kmn, k)
            kmx = imax(kmx, k)
        # keys beyond those of +Inf / -Inf: NaN or Inf in the block
        bad |= kmx >= np.int32(0x7F800000) or kmn <= np.int32(-0x7F800001)
        mn, mx = _min_max_values(x, b, kmn, kmx)
        d = (mx - mn) / F32(15.0)
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        o = i * 20
        put_f16(out, o, fp32_to_fp16(d))
        put_f16(out, o + 2, fp32_to_fp16(mn))
        if abs(inv) < _INF and abs(d) < _INF:
            for j in range(16):
                # (x - min)*id lies in [0, 15] here: the cast is a floor
                xi0 = imin(np.int32(15), floor_small((x[b + j] - mn) * inv + F32(0.5)))
                xi1 = imin(np.int32(15), floor_small((x[b + 16 + j] - mn) * inv + F32(0.5)))
                out[o + 4 + j] = xi0 | (xi1 << 4)
        else:
            for j in range(16):
                xi0 = min(15, to_i8(cvtt_i32((x[b + j] - mn) * inv + F32(0.5)))) & 0xFF
                xi1 = min(15, to_i8(cvtt_i32((x[b + 16 + j] - mn) * inv + F32(0.5)))) & 0xFF
                out[o + 4 + j] = (xi0 | (xi1 << 4)) & 0xFF
    return not bad


@njit(cache=True, nogil=True)
def _q4_1_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q4_1
    nb = y.size // 32
    for i in range(nb):
        o = i * 20
        d = get_f16(data, o)
        m = get_f16(data, o + 2)
        for j in range(16):
            q = data[o + 4 + j]
            y[i * 32 + j] = F32(q & 0x0F) * d + m
            y[i * 32 + 16 + j] = F32(q >> 4) * d + m


class Q4_1(BlockQuant, qtype=T.Q4_1):
    checks_finite = True
    quantize_blocks = staticmethod(_q4_1_quantize)
    dequantize_blocks = staticmethod(_q4_1_dequantize)


# ---------------------------------------------------------------- Q5_0


@njit(cache=True, nogil=True)
def _q5_0_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    # ref: ggml-quants.c quantize_row_q5_0_ref; first largest |x| found as in Q4_0;
    # returns False when x holds NaN or Inf. The high bits gather in qh with 32-bit
    # shifts (numba's int64 ones do not vectorize as well).
    nb = x.size // 32
    xu = x.view(np.uint32)
    seen = np.uint32(0)
    four = np.uint32(4)
    low = np.uint32(0x0F)
    for i in range(nb):
        b = i * 32
        m, mx = _first_max_magnitude(x, xu, b)
        seen = imax(seen, m)
        d = mx / F32(-16.0)
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        o = i * 22
        put_f16(out, o, fp32_to_fp16(d))
        qh = np.uint32(0)
        if abs(inv) < _INF:
            for j in range(16):
                xi0 = np.uint32(imin(np.int32(31), floor_small(x[b + j] * inv + F32(16.5))))
                xi1 = np.uint32(imin(np.int32(31), floor_small(x[b + 16 + j] * inv + F32(16.5))))
                out[o + 6 + j] = np.uint8((xi0 & low) | ((xi1 & low) << four))
                qh |= ((xi0 >> four) << np.uint32(j)) | ((xi1 >> four) << np.uint32(j + 16))
        else:
            for j in range(16):
                xi0 = np.uint32(min(31, to_i8(cvtt_i32(x[b + j] * inv + F32(16.5)))) & 0xFF)
                xi1 = np.uint32(min(31, to_i8(cvtt_i32(x[b + 16 + j] * inv + F32(16.5)))) & 0xFF)
                out[o + 6 + j] = np.uint8((xi0 & low) | ((xi1 & low) << four))
                # codes here may be negative int8 (128..255 as bytes): bit 4 only
                one = np.uint32(1)
                qh |= (((xi0 >> four) & one) << np.uint32(j)) | (
                    ((xi1 >> four) & one) << np.uint32(j + 16)
                )
        for k in range(4):
            out[o + 2 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))
    return seen < _EXP_ALL


@njit(cache=True, nogil=True)
def _get_u32(data: np.ndarray, o: int) -> int:
    return (
        np.uint32(data[o])
        | (np.uint32(data[o + 1]) << np.uint32(8))
        | (np.uint32(data[o + 2]) << np.uint32(16))
        | (np.uint32(data[o + 3]) << np.uint32(24))
    )


@njit(cache=True, nogil=True)
def _q5_0_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q5_0
    nb = y.size // 32
    for i in range(nb):
        o = i * 22
        d = get_f16(data, o)
        qh = _get_u32(data, o + 2)
        for j in range(16):
            xh0 = ((qh >> np.uint32(j)) << np.uint32(4)) & np.uint32(0x10)
            xh1 = (qh >> np.uint32(j + 12)) & np.uint32(0x10)
            q = data[o + 6 + j]
            y[i * 32 + j] = F32(np.int32((q & 0x0F) | xh0) - 16) * d
            y[i * 32 + 16 + j] = F32(np.int32((q >> 4) | xh1) - 16) * d


class Q5_0(BlockQuant, qtype=T.Q5_0):
    checks_finite = True
    quantize_blocks = staticmethod(_q5_0_quantize)
    dequantize_blocks = staticmethod(_q5_0_dequantize)


# ---------------------------------------------------------------- Q5_1


@njit(cache=True, nogil=True)
def _q5_1_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    # ref: ggml-quants.c quantize_row_q5_1_ref; returns False when x holds NaN or Inf
    nb = x.size // 32
    xu = x.view(np.uint32)
    bad = False
    for i in range(nb):
        b = i * 32
        kmn = np.int32(0x7FFFFFFF)
        kmx = np.int32(-0x7FFFFFFF - 1)
        for j in range(32):
            u = xu[b + j]
            k = np.int32(u) ^ ((np.int32(u) >> np.int32(31)) & np.int32(0x7FFFFFFF))
            kmn = imin(kmn, k)
            kmx = imax(kmx, k)
        # keys beyond those of +Inf / -Inf: NaN or Inf in the block
        bad |= kmx >= np.int32(0x7F800000) or kmn <= np.int32(-0x7F800001)
        mn, mx = _min_max_values(x, b, kmn, kmx)
        d = (mx - mn) / F32(31.0)
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        o = i * 24
        put_f16(out, o, fp32_to_fp16(d))
        put_f16(out, o + 2, fp32_to_fp16(mn))
        qh = np.uint32(0)
        four = np.uint32(4)
        low = np.uint32(0x0F)
        one = np.uint32(1)
        if abs(inv) < _INF and abs(d) < _INF:
            for j in range(16):
                # (uint8_t)(x0 + 0.5f): no clamp in the C code, only the low byte survives
                xi0 = np.uint32(floor_small((x[b + j] - mn) * inv + F32(0.5)) & 0xFF)
                xi1 = np.uint32(floor_small((x[b + 16 + j] - mn) * inv + F32(0.5)) & 0xFF)
                out[o + 8 + j] = np.uint8((xi0 & low) | ((xi1 & low) << four))
                qh |= (((xi0 >> four) & one) << np.uint32(j)) | (
                    ((xi1 >> four) & one) << np.uint32(j + 16)
                )
        else:
            for j in range(16):
                xi0 = np.uint32(cvtt_i32((x[b + j] - mn) * inv + F32(0.5)) & 0xFF)
                xi1 = np.uint32(cvtt_i32((x[b + 16 + j] - mn) * inv + F32(0.5)) & 0xFF)
                out[o + 8 + j] = np.uint8((xi0 & low) | ((xi1 & low) << four))
                qh |= (((xi0 >> four) & one) << np.uint32(j)) | (
                    ((xi1 >> four) & one) << np.uint32(j + 16)
                )
        for k in range(4):
            out[o + 4 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))
    return not bad


@njit(cache=True, nogil=True)
def _q5_1_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q5_1
    nb = y.size // 32
    for i in range(nb):
        o = i * 24
        d = get_f16(data, o)
        m = get_f16(data, o + 2)
        qh = _get_u32(data, o + 4)
        for j in range(16):
            xh0 = ((qh >> np.uint32(j)) << np.uint32(4)) & np.uint32(0x10)
            xh1 = (qh >> np.uint32(j + 12)) & np.uint32(0x10)
            q = data[o + 8 + j]
            y[i * 32 + j] = F32(np.int32((q & 0x0F) | xh0)) * d + m
            y[i * 32 + 16 + j] = F32(np.int32((q >> 4) | xh1)) * d + m


class Q5_1(BlockQuant, qtype=T.Q5_1):
    checks_finite = True
    quantize_blocks = staticmethod(_q5_1_quantize)
    dequantize_blocks = staticmethod(_q5_1_dequantize)


# ---------------------------------------------------------------- Q8_0


@njit(cache=True, nogil=True)
def q8_0_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    # ref: ggml-quants.c quantize_row_q8_0_ref. amax = MAX(amax, |x|) is, for finite
    # floats, the integer max of the magnitude bits; returns False when x holds NaN or Inf
    nb = x.size // 32
    xu = x.view(np.uint32)
    seen = np.uint32(0)
    for i in range(nb):
        b = i * 32
        m = np.uint32(0)
        for j in range(32):
            a = xu[b + j] & _ABS
            m = imax(m, a)
        seen = imax(seen, m)
        amax = bits_f32(np.uint32(m))
        d = amax / F32(127.0)
        inv = F32(1.0) / d if d != F32(0.0) else F32(0.0)
        o = i * 34
        put_f16(out, o, fp32_to_fp16(d))
        if abs(inv) < _INF:
            for j in range(32):
                out[o + 2 + j] = np.int32(roundf(x[b + j] * inv)) & 0xFF
        else:
            for j in range(32):
                out[o + 2 + j] = cvtt_i32(roundf(x[b + j] * inv)) & 0xFF
    return seen < _EXP_ALL


@njit(cache=True, nogil=True)
def _q8_0_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q8_0
    nb = y.size // 32
    for i in range(nb):
        o = i * 34
        d = get_f16(data, o)
        for j in range(32):
            y[i * 32 + j] = F32(np.int8(data[o + 2 + j])) * d


class Q8_0(BlockQuant, qtype=T.Q8_0):
    checks_finite = True
    quantize_blocks = staticmethod(q8_0_quantize)
    dequantize_blocks = staticmethod(_q8_0_dequantize)
