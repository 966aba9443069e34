"""The numba kernels of QAT grid recovery (`quant.lattice`): per block, the scale search
over the codes of Q4_0 or TQ2_0, the grid encoding or ggml's reference encoding, and
the histogram the encoder counts."""

from __future__ import annotations

import numpy as np
from numba import njit

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

# hist slots: 0..32 = signed code of the max element + 16; 33 = grid blocks with an exact
# fp16 scale; 34 = grid blocks with a bf16-valued exact scale
H_EXACT = 33
H_BF16 = 34
H_SIZE = 35


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
def grid_blocks(
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
    `apply_bf16` writes when the whole tensor turns out to have bf16 scales. Blocks
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
            hist[H_EXACT] += 1
        if best_bf >= 0:
            hist[H_BF16] += 1
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
def grid_q4_0(x: np.ndarray, out: np.ndarray, alt: np.ndarray, hist: np.ndarray) -> bool:
    return grid_blocks(x, out, alt, hist, 32, 18, -8, 7, 8, 0)


@njit(cache=True, nogil=True)
def grid_tq2_0(x: np.ndarray, out: np.ndarray, alt: np.ndarray, hist: np.ndarray) -> bool:
    return grid_blocks(x, out, alt, hist, 256, 66, -1, 2, 2, 64)


@njit(cache=True, nogil=True)
def apply_bf16(out: np.ndarray, alt: np.ndarray, ts: int, doff: int) -> None:
    for i in range(alt.size):
        h = alt[i]
        if h != _NO_CAND:
            out[i * ts + doff] = np.uint8(h & 0xFF)
            out[i * ts + doff + 1] = np.uint8(h >> 8)
