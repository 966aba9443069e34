"""The scale searches the K-quants share (ggml-quants.c make_qkx2_quants and the
sub-block maxima of make_qx_quants / make_q3_quants), run side by side as vector
lanes: one lane per sub-block of a super-block."""

from __future__ import annotations

import numpy as np
from numba import njit

from qatgguf.quant._fp import F32
from qatgguf.quant.intrinsics import code_f32, select_store

GROUP_MAX_EPS = F32(1e-15)  # ref: ggml-quants.c GROUP_MAX_EPS
ZERO = F32(0.0)
ONE = F32(1.0)

# rows of the qkx2 search's lane scratch `ln` (one float32 row of lanes each)
(LN_MN, LN_MX, LN_SW, LN_SX, LN_ISC, LN_SCL, LN_BEST, LN_BISC, LN_BMN) = range(9)
(LN_SL, LN_SL2, LN_SXL, LN_ERR, LN_TSC, LN_TMN, LN_D, LN_FLAT, LN_FMIN) = range(9, 18)
QKX_ROWS = 18


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def qkx2_lanes(
    xt: np.ndarray,
    wt: np.ndarray,
    lt: np.ndarray,
    ln: np.ndarray,
    nl: int,
    n: int,
    nmax: int,
    rmin: float,
    nstep: int,
    use_mad: bool,
) -> None:
    """make_qkx2_quants (rdelta 0.1) for nl sub-blocks of n elements side by side: lane j
    searches a sub-block whose element k is xt[k, j], with weight wt[k, j]. Each lane
    keeps C's sequential sums and association; a lane's choices are selects. Leaves in
    ln: the scale (LN_SCL), min (LN_MN, before negation), the iscale and min the winning
    codes were rounded with (LN_BISC, LN_BMN), and for a constant sub-block (C's `max == min`
    exit) LN_FLAT = 1 with its negated min in LN_FMIN; such a lane searches on a dummy range
    and its results are to be replaced. Lanes whose step has D <= 0 divide by zero;
    error_model="numpy" lets that give inf/NaN as in C, and the step is not taken.
    ref: ggml-quants.c make_qkx2_quants"""
    fnmax = F32(nmax)
    mn = ln[LN_MN]
    mx = ln[LN_MX]
    sw = ln[LN_SW]
    sx = ln[LN_SX]
    isc = ln[LN_ISC]
    scl = ln[LN_SCL]
    best = ln[LN_BEST]
    bisc = ln[LN_BISC]
    bmn = ln[LN_BMN]
    sl = ln[LN_SL]
    sl2 = ln[LN_SL2]
    sxl = ln[LN_SXL]
    err = ln[LN_ERR]
    tsc = ln[LN_TSC]
    tmn = ln[LN_TMN]
    dd = ln[LN_D]
    flat = ln[LN_FLAT]
    fmin = ln[LN_FMIN]
    for j in range(nl):
        v = xt[0, j]
        mn[j] = v
        mx[j] = v
        sw[j] = wt[0, j]
        sx[j] = wt[0, j] * v
    for k in range(1, n):
        for j in range(nl):
            v = xt[k, j]
            w = wt[k, j]
            mn[j] = select_store(v < mn[j], v, mn[j])
            mx[j] = select_store(v > mx[j], v, mx[j])
            sw[j] += w
            sx[j] += w * v
    for j in range(nl):
        m = ZERO if mn[j] > ZERO else mn[j]  # noqa: FURB136 (C's `if (min > 0) min = 0`)
        f = mx[j] == m
        flat[j] = ONE if f else ZERO
        fmin[j] = -m
        mn[j] = ZERO if f else m
        mx[j] = select_store(f, ONE, mx[j])
        isc[j] = fnmax / (mx[j] - mn[j])
        scl[j] = ONE / isc[j]
        best[j] = ZERO
        bisc[j] = isc[j]
        bmn[j] = mn[j]
    for k in range(n):
        for j in range(nl):
            v = xt[k, j]
            diff = scl[j] * code_f32(isc[j] * (v - mn[j]), 0, nmax) + mn[j] - v
            diff = abs(diff) if use_mad else diff * diff
            best[j] += wt[k, j] * diff
    for step in range(nstep + 1):
        num = rmin + F32(0.1) * F32(step) + fnmax
        for j in range(nl):
            isc[j] = num / (mx[j] - mn[j])
            sl[j] = ZERO
            sl2[j] = ZERO
            sxl[j] = ZERO
        for k in range(n):
            for j in range(nl):
                v = xt[k, j]
                w = wt[k, j]
                fl = code_f32(isc[j] * (v - mn[j]), 0, nmax)
                lt[k, j] = fl
                sl[j] += w * fl
                sl2[j] += w * fl * fl
                sxl[j] += w * fl * v
        for j in range(nl):
            d = sw[j] * sl2[j] - sl[j] * sl[j]
            dd[j] = d
            ts = (sw[j] * sxl[j] - sx[j] * sl[j]) / d
            tm = (sl2[j] * sx[j] - sl[j] * sxl[j]) / d
            ts0 = sxl[j] / sl2[j]
            pos = tm > ZERO
            tsc[j] = ts0 if pos else ts
            tmn[j] = ZERO if pos else tm
            err[j] = ZERO
        for k in range(n):
            for j in range(nl):
                diff = tsc[j] * lt[k, j] + tmn[j] - xt[k, j]
                diff = abs(diff) if use_mad else diff * diff
                err[j] += wt[k, j] * diff
        for j in range(nl):
            win = (dd[j] > ZERO) & (err[j] < best[j])
            bisc[j] = select_store(win, isc[j], bisc[j])
            bmn[j] = select_store(win, mn[j], bmn[j])
            best[j] = select_store(win, err[j], best[j])
            scl[j] = select_store(win, tsc[j], scl[j])
            mn[j] = select_store(win, tmn[j], mn[j])


@njit(cache=True, nogil=True, inline="always")
def lanes16_max(
    x: np.ndarray, xb: int, xt: np.ndarray, amax: np.ndarray, mx: np.ndarray
) -> None:
    """Transpose the super-block at xb into xt[k, j] (element k of 16-element sub-block j)
    and find each sub-block's first element of largest magnitude, as make_qx_quants and
    make_q3_quants do (`if (ax > amax) { amax = ax; max = x[i]; }`): amax[j], mx[j]."""
    for j in range(16):
        for k in range(16):
            xt[k, j] = x[xb + 16 * j + k]
    for j in range(16):
        amax[j] = ZERO
        mx[j] = ZERO
    for k in range(16):
        for j in range(16):
            v = xt[k, j]
            ax = abs(v)
            gt = ax > amax[j]
            amax[j] = select_store(gt, ax, amax[j])
            mx[j] = select_store(gt, v, mx[j])
