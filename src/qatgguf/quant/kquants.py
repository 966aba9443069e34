"""K-quants (super-blocks of 256): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Ports of ggml's `quantize_row_*_K_ref` and their helpers (`make_qkx2_quants`,
`make_qx_quants`, `make_q3_quants`). The scale searches compare float32 error sums, so
every sum runs in the C loops' sequential order and every product keeps the C
association (`w*l*x` is `(w*l)*x`); integers are cast to float32 before they meet a
float, since numba would otherwise widen to float64.

The searches of a super-block's sub-blocks run side by side as vector lanes: the
super-block is transposed to `xt[k, j]` (element k of sub-block j), every inner loop is
`for k: for j` over per-lane arrays, each lane keeps C's sequential order, its choices
are selects, and dummy values keep degenerate lanes harmless until their results are
replaced.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from qatgguf.quant._fp import F32, fp32_to_fp16, get_f16, imax, imin, nearest_int, put_f16
from qatgguf.quant.intrinsics import code_f32, select_store
from qatgguf.quant.kq_search import (
    GROUP_MAX_EPS,
    LN_BISC,
    LN_BMN,
    LN_FLAT,
    LN_FMIN,
    LN_MN,
    LN_SCL,
    ONE,
    QKX_ROWS,
    ZERO,
    lanes16_max,
    qkx2_lanes,
)
from qatgguf.quant.registry import BlockQuant


@njit(cache=True, nogil=True)
def _get_scale_min_k4(j: int, s: np.ndarray, so: int) -> tuple[int, int]:
    # ref: ggml-quants.c get_scale_min_k4
    if j < 4:
        return s[so + j] & 63, s[so + j + 4] & 63
    return (s[so + j + 4] & 0xF) | ((s[so + j - 4] >> 6) << 4), (s[so + j + 4] >> 4) | (
        (s[so + j] >> 6) << 4
    )


@njit(cache=True, nogil=True)
def _pack_scales_k4(out: np.ndarray, so: int, j: int, ls: int, lm: int) -> None:
    if j < 4:
        out[so + j] = ls
        out[so + j + 4] = lm
    else:
        out[so + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        out[so + j - 4] |= (ls >> 4) << 6
        out[so + j] |= (lm >> 4) << 6


@njit(cache=True, nogil=True, error_model="numpy")
def _qkx_quantize(
    x: np.ndarray, out: np.ndarray, nmax: int, rmin: float, step_count: int, bpb: int
) -> None:
    """Q4_K (nmax=15) and Q5_K (nmax=31): one body, the C functions differ only in the
    search range and the bit packing. ref: quantize_row_q4_K_ref, quantize_row_q5_K_ref

    Two super-blocks are searched together: lane 8*p + j is sub-block j of super-block
    i0 + p (an odd last super-block searches beside a copy of itself)."""
    nb = x.size // 256
    L = np.empty(256, np.uint8)
    xt = np.empty((32, 16), np.float32)  # [element k][lane]
    wt = np.empty((32, 16), np.float32)
    lt = np.empty((32, 16), np.float32)
    ln = np.empty((QKX_ROWS, 16), np.float32)
    sx2 = np.empty(16, np.float32)
    mins = np.empty(8, np.float32)
    scales = np.empty(8, np.float32)
    for i0 in range(0, nb, 2):
        for p in range(2):
            xb = min(i0 + p, nb - 1) * 256
            for j in range(8):
                for k in range(32):
                    xt[k, 8 * p + j] = x[xb + 32 * j + k]
        for j in range(16):
            sx2[j] = ZERO
        for k in range(32):
            for j in range(16):
                v = xt[k, j]
                sx2[j] += v * v
        for j in range(16):
            sx2[j] = np.sqrt(sx2[j] / F32(32.0))
        for k in range(32):
            for j in range(16):
                wt[k, j] = sx2[j] + abs(xt[k, j])
        qkx2_lanes(xt, wt, lt, ln, 16, 32, nmax, rmin, step_count, False)
        for i in range(i0, min(i0 + 2, nb)):
            lo = 8 * (i - i0)
            xb = i * 256
            o = i * bpb
            max_scale = ZERO
            max_min = ZERO
            for j in range(8):
                flat = ln[LN_FLAT, lo + j] != ZERO
                sc = ZERO if flat else ln[LN_SCL, lo + j]
                mi = ln[LN_FMIN, lo + j] if flat else -ln[LN_MN, lo + j]
                scales[j] = sc
                mins[j] = mi
                max_scale = sc if sc > max_scale else max_scale  # noqa: FURB136 (C order)
                max_min = mi if mi > max_min else max_min  # noqa: FURB136 (C order)
            inv_scale = F32(63.0) / max_scale if max_scale > ZERO else ZERO
            inv_min = F32(63.0) / max_min if max_min > ZERO else ZERO
            for k in range(12):
                out[o + 4 + k] = 0
            for j in range(8):
                ls = imin(63, nearest_int(inv_scale * scales[j]) & 0xFF)
                lm = imin(63, nearest_int(inv_min * mins[j]) & 0xFF)
                _pack_scales_k4(out, o + 4, j, ls, lm)
            put_f16(out, o, fp32_to_fp16(max_scale / F32(63.0)))
            put_f16(out, o + 2, fp32_to_fp16(max_min / F32(63.0)))
            dd = get_f16(out, o)
            dmin = get_f16(out, o + 2)
            for j in range(8):
                sc, m = _get_scale_min_k4(j, out, o + 4)
                d = dd * F32(sc)
                if d == ZERO:
                    # keeps the search's codes (zero for a constant sub-block)
                    if ln[LN_FLAT, lo + j] != ZERO:
                        for k in range(32):
                            L[32 * j + k] = 0
                    else:
                        s = ln[LN_BISC, lo + j]
                        mn = ln[LN_BMN, lo + j]
                        for k in range(32):
                            v = x[xb + 32 * j + k]
                            L[32 * j + k] = imax(0, imin(nmax, nearest_int(s * (v - mn))))
                    continue
                dm = dmin * F32(m)
                for k in range(32):
                    li = nearest_int((x[xb + 32 * j + k] + dm) / d)
                    L[32 * j + k] = imax(0, imin(nmax, li))
            if nmax == 15:
                q = o + 16
                for j in range(0, 256, 64):
                    for k in range(32):
                        out[q + k] = L[j + k] | (L[j + k + 32] << 4)
                    q += 32
            else:
                # codes 0..31: bit 4 of L[64*n + k] goes to bit 2n of qh[k], that of
                # L[64*n + 32 + k] to bit 2n + 1; the low nibbles to ql
                for k in range(32):
                    h = 0
                    for n in range(4):
                        l1 = L[64 * n + k]
                        l2 = L[64 * n + 32 + k]
                        h |= ((l1 >> 4) << (2 * n)) | ((l2 >> 4) << (2 * n + 1))
                        out[o + 48 + 32 * n + k] = (l1 & 15) | ((l2 & 15) << 4)
                    out[o + 16 + k] = h


@njit(cache=True, nogil=True)
def _q4_k_quantize(x: np.ndarray, out: np.ndarray) -> None:
    _qkx_quantize(x, out, 15, F32(-1.0), 20, 144)


@njit(cache=True, nogil=True)
def _q5_k_quantize(x: np.ndarray, out: np.ndarray) -> None:
    _qkx_quantize(x, out, 31, F32(-0.5), 15, 176)


@njit(cache=True, nogil=True)
def _q4_k_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q4_K
    nb = y.size // 256
    for i in range(nb):
        o = i * 144
        d = get_f16(data, o)
        dmin = get_f16(data, o + 2)
        q = o + 16
        yo = i * 256
        s = 0
        for _ in range(4):
            sc, m = _get_scale_min_k4(s, data, o + 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _get_scale_min_k4(s + 1, data, o + 4)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            for k in range(32):
                y[yo + k] = d1 * F32(data[q + k] & 0xF) - m1
            for k in range(32):
                y[yo + 32 + k] = d2 * F32(data[q + k] >> 4) - m2
            q += 32
            yo += 64
            s += 2


@njit(cache=True, nogil=True)
def _q5_k_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q5_K
    nb = y.size // 256
    for i in range(nb):
        o = i * 176
        d = get_f16(data, o)
        dmin = get_f16(data, o + 2)
        qh = o + 16
        ql = o + 48
        yo = i * 256
        s = 0
        u1 = 1
        u2 = 2
        for _ in range(4):
            sc, m = _get_scale_min_k4(s, data, o + 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _get_scale_min_k4(s + 1, data, o + 4)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            for k in range(32):
                hi = 16 if data[qh + k] & u1 else 0
                y[yo + k] = d1 * F32((data[ql + k] & 0xF) + hi) - m1
            for k in range(32):
                hi = 16 if data[qh + k] & u2 else 0
                y[yo + 32 + k] = d2 * F32((data[ql + k] >> 4) + hi) - m2
            ql += 32
            yo += 64
            s += 2
            u1 <<= 2
            u2 <<= 2


class Q4_K(BlockQuant, qtype=T.Q4_K):
    quantize_blocks = staticmethod(_q4_k_quantize)
    dequantize_blocks = staticmethod(_q4_k_dequantize)


class Q5_K(BlockQuant, qtype=T.Q5_K):
    quantize_blocks = staticmethod(_q5_k_quantize)
    dequantize_blocks = staticmethod(_q5_k_dequantize)


# ---------------------------------------------------------------- Q6_K


@njit(cache=True, nogil=True)
def _q6_k_quantize(x: np.ndarray, out: np.ndarray) -> None:
    # ref: ggml-quants.c quantize_row_q6_K_ref with make_qx_quants(16, 32, x, L, 1, NULL).
    # The 16 sub-blocks' scale searches run side by side (lane j = sub-block j): every
    # lane keeps C's sequential sums over its 16 elements, and the lanes vectorize.
    nb = x.size // 256
    L = np.empty(256, np.int32)
    xt = np.empty((16, 16), np.float32)  # [element k][sub-block j]
    amax = np.empty(16, np.float32)
    mx = np.empty(16, np.float32)
    isc = np.empty(16, np.float32)
    slx = np.empty(16, np.float32)
    sl2 = np.empty(16, np.float32)
    best = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    bisc = np.empty(16, np.float32)
    fnmax = F32(32.0)
    for i in range(nb):
        xb = i * 256
        o = i * 210
        lanes16_max(x, xb, xt, amax, mx)
        for j in range(16):
            # all-zero sub-blocks search on a dummy max; their results are replaced below
            if amax[j] < GROUP_MAX_EPS:
                mx[j] = ONE
        for step in range(-10, 10):
            if step == 0:
                continue
            if step == -10:
                for j in range(16):
                    isc[j] = -fnmax / mx[j]
            else:
                for j in range(16):
                    isc[j] = -(fnmax + F32(0.1) * F32(step)) / mx[j]
            for j in range(16):
                slx[j] = ZERO
                sl2[j] = ZERO
            for k in range(16):
                for j in range(16):
                    v = xt[k, j]
                    li = imax(-32, imin(31, nearest_int(isc[j] * v)))
                    w = v * v
                    fl = F32(li)
                    slx[j] += w * v * fl
                    sl2[j] += w * fl * fl
            if step == -10:
                for j in range(16):
                    sc = slx[j] / sl2[j] if sl2[j] != ZERO else ZERO
                    scales[j] = sc
                    best[j] = sc * slx[j]
                    bisc[j] = isc[j]
            else:
                for j in range(16):
                    if sl2[j] > ZERO and slx[j] * slx[j] > best[j] * sl2[j]:
                        sc = slx[j] / sl2[j]
                        scales[j] = sc
                        best[j] = sc * slx[j]
                        bisc[j] = isc[j]
        max_scale = ZERO
        max_abs_scale = ZERO
        for j in range(16):
            if amax[j] < GROUP_MAX_EPS:
                scales[j] = ZERO
            scale = scales[j]
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        if max_abs_scale < GROUP_MAX_EPS:
            for k in range(210):
                out[o + k] = 0
            continue
        iscale = F32(-128.0) / max_scale
        put_f16(out, o + 208, fp32_to_fp16(ONE / iscale))
        for ib in range(16):
            out[o + 192 + ib] = imin(127, nearest_int(iscale * scales[ib])) & 0xFF
        dd = get_f16(out, o + 208)
        for j in range(16):
            d = dd * F32(np.int8(out[o + 192 + j]))
            if d == ZERO:
                # keeps the search's codes (zero for an all-zero sub-block)
                if amax[j] < GROUP_MAX_EPS:
                    for k in range(16):
                        L[16 * j + k] = 0
                else:
                    s = bisc[j]
                    for k in range(16):
                        L[16 * j + k] = 32 + imax(-32, imin(31, nearest_int(s * x[xb + 16 * j + k])))
                continue
            for k in range(16):
                li = nearest_int(x[xb + 16 * j + k] / d)
                L[16 * j + k] = imax(-32, imin(31, li)) + 32
        ql = o
        qh = o + 128
        for j in range(0, 256, 128):
            for k in range(32):
                q1 = L[j + k] & 0xF
                q2 = L[j + k + 32] & 0xF
                q3 = L[j + k + 64] & 0xF
                q4 = L[j + k + 96] & 0xF
                out[ql + k] = q1 | (q3 << 4)
                out[ql + k + 32] = q2 | (q4 << 4)
                out[qh + k] = (
                    (L[j + k] >> 4)
                    | ((L[j + k + 32] >> 4) << 2)
                    | ((L[j + k + 64] >> 4) << 4)
                    | ((L[j + k + 96] >> 4) << 6)
                ) & 0xFF
            ql += 64
            qh += 32


@njit(cache=True, nogil=True)
def _q6_k_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q6_K
    nb = y.size // 256
    for i in range(nb):
        o = i * 210
        d = get_f16(data, o + 208)
        ql = o
        qh = o + 128
        sc = o + 192
        yo = i * 256
        for _ in range(2):
            for k in range(32):
                s = k // 16
                h = data[qh + k]
                q1 = np.int32((data[ql + k] & 0xF) | ((h & 3) << 4)) - 32
                q2 = np.int32((data[ql + k + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32
                q3 = np.int32((data[ql + k] >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = np.int32((data[ql + k + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                y[yo + k] = d * F32(np.int8(data[sc + s])) * F32(q1)
                y[yo + k + 32] = d * F32(np.int8(data[sc + s + 2])) * F32(q2)
                y[yo + k + 64] = d * F32(np.int8(data[sc + s + 4])) * F32(q3)
                y[yo + k + 96] = d * F32(np.int8(data[sc + s + 6])) * F32(q4)
            yo += 128
            ql += 64
            qh += 32
            sc += 8


class Q6_K(BlockQuant, qtype=T.Q6_K):
    quantize_blocks = staticmethod(_q6_k_quantize)
    dequantize_blocks = staticmethod(_q6_k_dequantize)


# ---------------------------------------------------------------- Q2_K


@njit(cache=True, nogil=True, error_model="numpy")
def _q2_k_quantize(x: np.ndarray, out: np.ndarray) -> None:
    # ref: ggml-quants.c quantize_row_q2_K_ref; layout scales[16] qs[64] d dmin
    nb = x.size // 256
    L = np.empty(256, np.uint8)
    xt = np.empty((16, 16), np.float32)  # [element k][sub-block j]
    wt = np.empty((16, 16), np.float32)
    lt = np.empty((16, 16), np.float32)
    ln = np.empty((QKX_ROWS, 16), np.float32)
    mins = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    q4scale = F32(15.0)
    for i in range(nb):
        xb = i * 256
        o = i * 84
        for j in range(16):
            for k in range(16):
                v = x[xb + 16 * j + k]
                xt[k, j] = v
                wt[k, j] = abs(v)
        qkx2_lanes(xt, wt, lt, ln, 16, 16, 3, F32(-0.5), 15, True)
        max_scale = ZERO
        max_min = ZERO
        for j in range(16):
            flat = ln[LN_FLAT, j] != ZERO
            sc = ZERO if flat else ln[LN_SCL, j]
            mi = ln[LN_FMIN, j] if flat else -ln[LN_MN, j]
            scales[j] = sc
            mins[j] = mi
            max_scale = sc if sc > max_scale else max_scale  # noqa: FURB136 (C order)
            max_min = mi if mi > max_min else max_min  # noqa: FURB136 (C order)
        if max_scale > ZERO:
            iscale = q4scale / max_scale
            for j in range(16):
                out[o + j] = nearest_int(iscale * scales[j]) & 0xFF
            put_f16(out, o + 80, fp32_to_fp16(max_scale / q4scale))
        else:
            for j in range(16):
                out[o + j] = 0
            put_f16(out, o + 80, fp32_to_fp16(ZERO))
        if max_min > ZERO:
            iscale = q4scale / max_min
            for j in range(16):
                out[o + j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
            put_f16(out, o + 82, fp32_to_fp16(max_min / q4scale))
        else:
            put_f16(out, o + 82, fp32_to_fp16(ZERO))
        dd = get_f16(out, o + 80)
        dmin = get_f16(out, o + 82)
        for j in range(16):
            d = dd * F32(out[o + j] & 0xF)
            if d == ZERO:
                # keeps the search's codes (zero for a constant sub-block)
                if ln[LN_FLAT, j] != ZERO:
                    for k in range(16):
                        L[16 * j + k] = 0
                else:
                    s = ln[LN_BISC, j]
                    mn = ln[LN_BMN, j]
                    for k in range(16):
                        v = x[xb + 16 * j + k]
                        L[16 * j + k] = imax(0, imin(3, nearest_int(s * (v - mn))))
                continue
            dm = dmin * F32(out[o + j] >> 4)
            for k in range(16):
                li = nearest_int((x[xb + 16 * j + k] + dm) / d)
                L[16 * j + k] = imax(0, imin(3, li))
        for j in range(0, 256, 128):
            for k in range(32):
                out[o + 16 + j // 4 + k] = (
                    L[j + k] | (L[j + k + 32] << 2) | (L[j + k + 64] << 4) | (L[j + k + 96] << 6)
                )


@njit(cache=True, nogil=True)
def _q2_k_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q2_K
    nb = y.size // 256
    for i in range(nb):
        o = i * 84
        d = get_f16(data, o + 80)
        mn = get_f16(data, o + 82)
        q = o + 16
        yo = i * 256
        s = 0
        for _ in range(2):
            shift = 0
            for _j in range(4):
                sc = data[o + s]
                s += 1
                dl = d * F32(sc & 0xF)
                ml = mn * F32(sc >> 4)
                for k in range(16):
                    y[yo + k] = dl * F32((data[q + k] >> shift) & 3) - ml
                yo += 16
                sc = data[o + s]
                s += 1
                dl = d * F32(sc & 0xF)
                ml = mn * F32(sc >> 4)
                for k in range(16):
                    y[yo + k] = dl * F32((data[q + 16 + k] >> shift) & 3) - ml
                yo += 16
                shift += 2
            q += 32


class Q2_K(BlockQuant, qtype=T.Q2_K):
    quantize_blocks = staticmethod(_q2_k_quantize)
    dequantize_blocks = staticmethod(_q2_k_dequantize)


# ---------------------------------------------------------------- Q3_K


@njit(cache=True, nogil=True)
def _q3_scale(s: np.ndarray, so: int, j: int) -> int:
    # 6-bit signed sub-block scale: low 4 bits in scales[0..7], high 2 bits in scales[8..11]
    if j < 8:
        lo = np.int64(s[so + j]) & 0xF
    else:
        lo = np.int64(s[so + j - 8]) >> 4
    hi = (np.int64(s[so + 8 + j % 4]) >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=True, nogil=True, error_model="numpy")
def _q3_k_quantize(x: np.ndarray, out: np.ndarray) -> None:
    # ref: ggml-quants.c quantize_row_q3_K_ref with make_q3_quants(16, 4, x, L, true);
    # layout hmask[32] qs[64] scales[12] d. The 16 sub-blocks' searches run side by side
    # (lane j = sub-block j), every lane in C's sequential order. A lane's refinement pass
    # that changes nothing leaves its state as it was, so later passes change nothing
    # either: running such a lane on until every lane has stopped is C's early exit.
    nb = x.size // 256
    L = np.empty(256, np.int32)
    xt = np.empty((16, 16), np.float32)  # [element k][sub-block j]
    lt = np.empty((16, 16), np.float32)  # codes -4..3 as floats
    amax = np.empty(16, np.float32)
    mx = np.empty(16, np.float32)
    isc = np.empty(16, np.float32)
    slx = np.empty(16, np.float32)
    sl2 = np.empty(16, np.float32)
    nch = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    sc8 = np.empty(16, np.int32)
    dv = np.empty(16, np.float32)
    for i in range(nb):
        xb = i * 256
        o = i * 110
        so = o + 96
        lanes16_max(x, xb, xt, amax, mx)
        for j in range(16):
            # all-zero sub-blocks search on a dummy max; their results are replaced below
            m = ONE if amax[j] < GROUP_MAX_EPS else mx[j]
            isc[j] = F32(-4.0) / m
            slx[j] = ZERO
            sl2[j] = ZERO
        for k in range(16):
            for j in range(16):
                v = xt[k, j]
                fl = code_f32(isc[j] * v, -4, 3)
                lt[k, j] = fl
                w = v * v
                slx[j] += w * v * fl
                sl2[j] += w * fl * fl
        for _itry in range(5):
            for j in range(16):
                nch[j] = ZERO
            for k in range(16):
                for j in range(16):
                    v = xt[k, j]
                    w = v * v
                    fli = lt[k, j]
                    s_lx = slx[j] - w * v * fli
                    s_l2 = sl2[j] - w * fli * fli
                    new_l = code_f32(v * s_l2 / s_lx, -4, 3)
                    n_lx = s_lx + w * v * new_l
                    n_l2 = s_l2 + w * new_l * new_l
                    ok = (
                        (s_lx > ZERO)
                        & (new_l != fli)
                        & (n_l2 > ZERO)
                        & (n_lx * n_lx * sl2[j] > slx[j] * slx[j] * n_l2)
                    )
                    lt[k, j] = select_store(ok, new_l, fli)
                    slx[j] = select_store(ok, n_lx, slx[j])
                    sl2[j] = select_store(ok, n_l2, sl2[j])
                    nch[j] += ONE if ok else ZERO
            changed = ZERO
            for j in range(16):
                changed += nch[j]
            if changed == ZERO:
                break
        max_scale = ZERO
        amx = ZERO
        for j in range(16):
            sc = slx[j] / sl2[j] if sl2[j] > ZERO else ZERO
            if amax[j] < GROUP_MAX_EPS:
                sc = ZERO
            scales[j] = sc
            if abs(sc) > amx:
                amx = abs(sc)
                max_scale = sc
        for k in range(12):
            out[so + k] = 0
        if max_scale != ZERO:
            iscale = F32(-32.0) / max_scale
            for j in range(16):
                li = np.int32(np.int8(nearest_int(iscale * scales[j]) & 0xFF))
                li = imax(-32, imin(31, li)) + 32
                sc8[j] = li - 32  # what the packed 6 bits read back as
                if j < 8:
                    out[so + j] = li & 0xF
                else:
                    out[so + j - 8] |= (li & 0xF) << 4
                li >>= 4
                out[so + j % 4 + 8] |= li << (2 * (j // 4))
            put_f16(out, o + 108, fp32_to_fp16(ONE / iscale))
        else:
            for j in range(16):
                sc8[j] = -32
            put_f16(out, o + 108, fp32_to_fp16(ZERO))
        dd = get_f16(out, o + 108)
        for j in range(16):
            dv[j] = dd * F32(sc8[j])
        for k in range(16):
            for j in range(16):
                d = dv[j]
                q = code_f32(xt[k, j] / d, -4, 3)
                # where d is zero C keeps the search's codes (zero for an all-zero sub-block)
                keep = F32(-4.0) if amax[j] < GROUP_MAX_EPS else lt[k, j]
                lt[k, j] = (keep if d == ZERO else q) + F32(4.0)
        for j in range(16):
            for k in range(16):
                L[16 * j + k] = np.int32(lt[k, j])
        # element e: high bit (L >= 4) to bit e // 32 of hmask[e % 32], low bits to qs
        for k in range(32):
            h = 0
            for b in range(8):
                h |= (L[32 * b + k] >> 2) << b
            out[o + k] = h
        for j in range(0, 256, 128):
            for k in range(32):
                out[o + 32 + j // 4 + k] = (
                    (L[j + k] & 3)
                    | ((L[j + k + 32] & 3) << 2)
                    | ((L[j + k + 64] & 3) << 4)
                    | ((L[j + k + 96] & 3) << 6)
                )


@njit(cache=True, nogil=True)
def _q3_k_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    # ref: ggml-quants.c dequantize_row_q3_K (scales unpacked as the quantizer packs them)
    nb = y.size // 256
    for i in range(nb):
        o = i * 110
        so = o + 96
        d_all = get_f16(data, o + 108)
        yo = i * 256
        for j in range(16):
            sc8 = _q3_scale(data, so, j)
            dl = d_all * F32(sc8)
            for k in range(16):
                e = 16 * j + k  # element index inside the super-block
                half = e // 128
                r = e % 128
                shift = 2 * (r // 32)
                lq = (data[o + 32 + 32 * half + r % 32] >> shift) & 3
                hbit = (data[o + e % 32] >> (e // 32)) & 1
                y[yo + e] = dl * F32(np.int32(lq) - (0 if hbit else 4))


class Q3_K(BlockQuant, qtype=T.Q3_K):
    quantize_blocks = staticmethod(_q3_k_quantize)
    dequantize_blocks = staticmethod(_q3_k_dequantize)
