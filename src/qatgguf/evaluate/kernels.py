"""The per-row work of both evaluation passes as numba kernels, in perplexity.cpp's
arithmetic: the same float32 expressions, `expf` values equal to the C library's, double
sums in the C loops' order. So every per-token value is the one llama-perplexity computes
from the same logits, bit for bit.

ref: tools/perplexity/perplexity.cpp log_softmax(int, const float *, uint16_t *, int)
(the base pass) and log_softmax(int, const float *, const uint16_t *, int,
kl_divergence_result &) (the KLD pass).

`expf` is the C library's algorithm (glibc >= 2.28: a 32-entry table of 2**(i/32) and a
cubic, in double), written out so that LLVM vectorizes it, in the variant libm runs on
this CPU (with FMA where the CPU has FMA and AVX2, as libm's own dispatch picks). The
port is checked against libm's `expf` at first use (`expf_matches_libm`); where they
differ (another C library), the kernels call libm's `expf` one value at a time instead:
slower, still the tool's values. llama-perplexity sums with a plain loop of `expf`
calls; these kernels compute a row's `expf` values a vector at a time into a scratch row, then
add them up in the same order.
"""

from __future__ import annotations

import math
from functools import cache

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

F32 = np.float32

# float32 logits -> uint16 code, as perplexity.cpp's nearest_int (1.5 * 2**23 trick)
_MAGIC = F32(12582912.0)
_RANGE = F32(16.0)  # ref: perplexity.cpp `std::max(min_logit, max_logit - 16)`
_CODES = F32(65535.0)
_KLD_FLOOR = F32(-16.0)  # ref: perplexity.cpp `if (p_log_base > -16.f)`
_KEEP_FLOOR = F32(-16.5)  # the record keeps codes above this (records.KEEP_FLOOR)

# expf: 2**(i/32) correctly rounded to double, bits minus i << 47 (so that adding k << 47
# for k = 32*e + i gives 2**(k/32)); checked against that definition by the tests
_EXP2_TAB = np.array(
    [
        0x3FF0000000000000, 0x3FEFD9B0D3158574, 0x3FEFB5586CF9890F, 0x3FEF9301D0125B51,
        0x3FEF72B83C7D517B, 0x3FEF54873168B9AA, 0x3FEF387A6E756238, 0x3FEF1E9DF51FDEE1,
        0x3FEF06FE0A31B715, 0x3FEEF1A7373AA9CB, 0x3FEEDEA64C123422, 0x3FEECE086061892D,
        0x3FEEBFDAD5362A27, 0x3FEEB42B569D4F82, 0x3FEEAB07DD485429, 0x3FEEA47EB03A5585,
        0x3FEEA09E667F3BCD, 0x3FEE9F75E8EC5F74, 0x3FEEA11473EB0187, 0x3FEEA589994CCE13,
        0x3FEEACE5422AA0DB, 0x3FEEB737B0CDC5E5, 0x3FEEC49182A3F090, 0x3FEED503B23E255D,
        0x3FEEE89F995AD3AD, 0x3FEEFF76F2FB5E47, 0x3FEF199BDD85529C, 0x3FEF3720DCEF9069,
        0x3FEF5818DCFBA487, 0x3FEF7C97337B9B5F, 0x3FEFA4AFA2A490DA, 0x3FEFD0765B6E4540,
    ],
    dtype=np.uint64,
)  # fmt: skip
_INV_LN2_N = float.fromhex("0x1.71547652b82fep5")  # 32 / ln 2
_SHIFT = float.fromhex("0x1.8p52")  # adding it rounds a double below 2**51 to an integer
_C0 = float.fromhex("0x1.c6af84b912394p-20")  # cubic of 2**(r/32), r in [-1/2, 1/2]
_C1 = float.fromhex("0x1.ebfce50fac4f3p-13")
_C2 = float.fromhex("0x1.62e42ff0c52d6p-6")
_OVERFLOW = F32(float.fromhex("0x1.62e42ep6"))  # above: +Inf
_UNDERFLOW = F32(float.fromhex("-0x1.9fe368p6"))  # below: +0
_MAY_UNDERFLOW = F32(
    float.fromhex("-0x1.9d1d9ep6")
)  # below (and not above): the smallest subnormal
_TINY = F32(2.0**-149)
_INF32 = F32(np.inf)


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a*b + c rounded once (llvm.fma: one vfmadd on a CPU with FMA)."""
    if not (a == b == c == types.float64):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)

    return types.float64(types.float64, types.float64, types.float64), codegen


@intrinsic
def _u64_as_f64(typingctx, u):  # type: ignore[no-untyped-def]
    if u != types.uint64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.uint64), codegen


@intrinsic
def _f64_as_u64(typingctx, d):  # type: ignore[no-untyped-def]
    if d != types.float64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(64))

    return types.uint64(types.float64), codegen


@intrinsic
def _bits(typingctx, x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def _expf_port(x: float, with_fma: bool) -> float:
    """The C library's expf(x), branch-free: the main path for every x, then selects for
    overflow, underflow and NaN (libm takes branches for those)."""
    xd = np.float64(x)
    if with_fma:
        # libm's FMA variant: both uses of InvLn2N*x are fused
        kds = _fma(_INV_LN2_N, xd, _SHIFT)
        kd = kds - _SHIFT
        r = _fma(_INV_LN2_N, xd, -kd)
    else:
        z = _INV_LN2_N * xd
        kds = z + _SHIFT
        kd = kds - _SHIFT
        r = z - kd
    ki = _f64_as_u64(kds)
    t = _EXP2_TAB[ki & np.uint64(31)] + (ki << np.uint64(47))
    s = _u64_as_f64(t)
    if with_fma:
        z = _fma(_C0, r, _C1)
        r2 = r * r
        y = _fma(_C2, r, 1.0)
        y = _fma(z, r2, y)
    else:
        z = _C0 * r + _C1
        r2 = r * r
        y = _C2 * r + 1.0
        y = z * r2 + y
    res = F32(y * s)
    res = _INF32 if x > _OVERFLOW else res
    res = _TINY if x < _MAY_UNDERFLOW else res
    res = F32(0.0) if x < _UNDERFLOW else res
    return x + x if np.isnan(x) else res


@njit(cache=True, nogil=True)
def _expf_port_array(x: np.ndarray, out: np.ndarray, with_fma: bool) -> None:
    for i in range(x.size):
        out[i] = _expf_port(x[i], with_fma)


@njit(cache=True, nogil=True)
def _expf_libm_array(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.size):
        out[i] = np.exp(x[i])  # a call to libm's expf per value


def _libm_has_fma_variant() -> bool:
    # libm picks its FMA variant where the CPU has FMA and AVX2; numba compiles for the
    # host unless NUMBA_CPU_NAME names another target (then no FMA instructions are
    # assumed, and llvm.fma would become a slow library call: the plain variant it is)
    if config.CPU_NAME not in (None, "host"):
        return False
    f = llvm.get_host_cpu_features()
    return bool(f.get("fma", False) and f.get("avx2", False))


WITH_FMA = _libm_has_fma_variant()


def check_inputs() -> np.ndarray:
    """float32 inputs the port is checked on at first use: both ends of every binade the
    logits reach, the special ranges and a dense sweep of [-20, 1]."""
    rng = np.random.default_rng(0)
    parts = [
        np.linspace(-20.0, 1.0, 1 << 16, dtype=np.float32),
        rng.uniform(-110.0, 90.0, 1 << 15).astype(np.float32),
        (rng.integers(0, 1 << 32, 1 << 15, dtype=np.uint64).astype(np.uint32)).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.0, 88.72283, 88.72284, -87.33655,
                  -103.27893, -103.27894, -103.97208, -103.97209, 1e-30, -1e-30],
                 dtype=np.float32),
    ]  # fmt: skip
    return np.concatenate(parts)


@cache
def expf_matches_libm() -> bool:
    """Whether the port gives libm's expf bits on `check_inputs()` (NaN as NaN). The
    reference is libm's own expf, called from compiled code one value at a time."""
    x = check_inputs()
    ours = np.empty_like(x)
    ref = np.empty_like(x)
    _expf_port_array(x, ours, WITH_FMA)
    _expf_libm_array(x, ref)
    same = ours.view(np.uint32) == ref.view(np.uint32)
    return bool(np.all(same | (np.isnan(ours) & np.isnan(ref))))


def use_port() -> bool:
    """Whether the kernels compute expf with the vectorized port (else: libm calls)."""
    return expf_matches_libm()


# ---------------------------------------------------------------- per-row pieces


@njit(cache=True, nogil=True, inline="always")
def _order_key(u: np.uint32) -> np.int32:
    # float order as signed-integer order (negative floats: magnitude bits flipped); its
    # own inverse. -0.0 sorts below +0.0, where C's comparisons call them equal
    i = np.int32(u)
    return np.int32(i ^ ((i >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@intrinsic
def _i32_as_f32(typingctx, i):  # type: ignore[no-untyped-def]
    if i != types.int32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


# Rows are worked in groups of GROUP: each row's sum is a chain of dependent double adds
# (C's order), and GROUP chains side by side keep the adder busy.
GROUP = 4


def scratch(n_vocab: int) -> np.ndarray:
    """The scratch one thread's kernels need: GROUP rows of vocab floats."""
    return np.empty((GROUP, n_vocab), np.float32)


@njit(cache=True, nogil=True, inline="always")
def _exp_row(x: np.ndarray, shift: float, e: np.ndarray, port: bool, with_fma: bool) -> None:
    """e[i] = expf(x[i] - shift). ref: perplexity.cpp `expf(logits[i] - max_logit)`"""
    if port:
        for i in range(x.size):
            e[i] = _expf_port(x[i] - shift, with_fma)
    else:
        for i in range(x.size):
            e[i] = np.exp(x[i] - shift)


@njit(cache=True, nogil=True, inline="always")
def _sums(e: np.ndarray, n: np.ndarray, out: np.ndarray) -> None:
    """out[g] = sum of (double) e[g, :n[g]] in index order, for the GROUP rows of e (rows
    past their n read as zeros: adding +0.0 to a sum that starts at +0.0 changes nothing)."""
    m = max(n[0], n[1], n[2], n[3])
    for g in range(GROUP):
        e[g, n[g] : m] = F32(0.0)
    a = e[0]
    b = e[1]
    c = e[2]
    d = e[3]
    s0 = s1 = s2 = s3 = 0.0
    for i in range(m):
        s0 += np.float64(a[i])
        s1 += np.float64(b[i])
        s2 += np.float64(c[i])
        s3 += np.float64(d[i])
    out[0] = s0
    out[1] = s1
    out[2] = s2
    out[3] = s3


@njit(cache=True, nogil=True, inline="always")
def _max_min(row: np.ndarray) -> tuple[float, float]:
    """(max, min) of a row, the values C's std::max/std::min loops find (a zero's sign
    aside), from the largest and smallest order key (an integer max/min, vectorized)."""
    xu = row.view(np.uint32)
    kmx = _order_key(xu[0])
    kmn = kmx
    for i in range(1, row.size):
        k = _order_key(xu[i])
        kmx = k if k > kmx else kmx  # noqa: FURB136 (a select; max() branches)
        kmn = k if k < kmn else kmn  # noqa: FURB136
    return _i32_as_f32(_order_key(np.uint32(kmx))), _i32_as_f32(_order_key(np.uint32(kmn)))


@njit(cache=True, nogil=True, inline="always")
def _min_kept_code(sc: float, mlp: float) -> int:
    """The smallest code c >= 1 whose log-prob sc*c + mlp is above -16.5 (65536: none).
    The log-prob is non-decreasing in c, so a bisection finds it, and `code >= it` is the
    record's keep rule for nonzero codes."""
    lo = 1
    hi = 65536
    while lo < hi:
        mid = (lo + hi) // 2
        if sc * F32(mid) + mlp > _KEEP_FLOOR:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(cache=True, nogil=True, error_model="numpy")
def encode_rows(
    x: np.ndarray,
    targets: np.ndarray,
    scale: np.ndarray,
    min_lp: np.ndarray,
    target_q: np.ndarray,
    kept: np.ndarray,
    q: np.ndarray,
    idx: np.ndarray,
    val: np.ndarray,
    e: np.ndarray,
    r0: int,
    r1: int,
    port: bool,
    with_fma: bool,
) -> None:
    """The base pass for rows r0..r1 of logits x [n, vocab]: the 16-bit log-prob record
    (scale, min log-prob, codes q [n, vocab]), the target's code and how many codes the
    record keeps (`kept`: those whose log-prob is above -16.5, or, for a zero code, the row
    minimum when that is above -16). Rows that keep fewer than a third of their codes also
    get the kept ones as (index, code) pairs in idx/val [n, >= vocab // 3 + 1]. `e` is
    `scratch(vocab)`.
    ref: perplexity.cpp log_softmax(int n_vocab, const float * logits, uint16_t * log_prob, int tok)
    """
    n_vocab = x.shape[1]
    mxs = np.empty(GROUP, np.float32)
    mns = np.empty(GROUP, np.float32)
    lens = np.zeros(GROUP, np.int64)
    sums = np.empty(GROUP, np.float64)
    for g0 in range(r0, r1, GROUP):
        m = min(GROUP, r1 - g0)
        for g in range(m):
            row = x[g0 + g]
            mx, mn = _max_min(row)
            lim = mx - _RANGE
            mxs[g] = mx
            mns[g] = lim if mn < lim else mn  # noqa: FURB136 (C's std::max(min_logit, max_logit - 16))
            _exp_row(row, mx, e[g], port, with_fma)
            lens[g] = n_vocab
        _sums(e, lens, sums)
        for g in range(m):
            r = g0 + g
            row = x[r]
            mx = mxs[g]
            mn = mns[g]
            lse = F32(math.log(sums[g]))
            mlp = mn - mx - lse
            sc = (mx - mn) / _CODES
            scale[r] = sc
            min_lp[r] = mlp
            qr = q[r]
            inv = F32(1.0) / sc if sc != F32(0.0) else F32(0.0)
            cmin = np.int32(_min_kept_code(sc, mlp))
            # a zero code decodes to the row minimum exactly: kept when that is above -16
            zero_kept = mlp > _KLD_FLOOR
            coded = sc != F32(0.0)
            n_kept = np.int32(0)
            for i in range(n_vocab):
                v = row[i]
                # nearest_int: the low 23 bits of v*inv + 1.5 * 2**23, as uint16 (C's cast)
                c = (np.int32(_bits(inv * (v - mn) + _MAGIC)) & np.int32(0x007FFFFF)) - np.int32(
                    0x00400000
                )
                c = c & np.int32(0xFFFF) if (v > mn) & coded else np.int32(0)
                qr[i] = np.uint16(c)
                keep = (c >= cmin) | ((c == np.int32(0)) & zero_kept)
                n_kept += np.int32(1) if keep else np.int32(0)
            kept[r] = n_kept
            target_q[r] = qr[targets[r]]
            if n_kept * 6 < n_vocab * 2:
                k = 0
                ir = idx[r]
                vr = val[r]
                for i in range(n_vocab):
                    c = np.int32(qr[i])
                    if (c >= cmin) | ((c == np.int32(0)) & zero_kept):
                        ir[k] = np.uint32(i)
                        vr[k] = np.uint16(c)
                        k += 1


@njit(cache=True, nogil=True, inline="always")
def _first_max(row: np.ndarray) -> int:
    """The index C's `if (logits[i] > max_logit)` scan from logits[0] ends on: the first
    largest value, found from the largest order key; equal floats of other sign (+0/-0)
    and NaN take the C scan itself."""
    n = row.size
    xu = row.view(np.uint32)
    kmx = _order_key(xu[0])
    for i in range(1, n):
        k = _order_key(xu[i])
        kmx = k if k > kmx else kmx  # noqa: FURB136
    imax = 0
    while _order_key(xu[imax]) != kmx:
        imax += 1
    mx = row[imax]
    if mx == F32(0.0) or np.isnan(mx) or np.isnan(row[0]):
        imax = 0
        mx = row[0]
        for i in range(1, n):
            if row[i] > mx:
                mx = row[i]
                imax = i
    return imax


@njit(cache=True, nogil=True, error_model="numpy")
def kld_rows(
    x: np.ndarray,
    targets: np.ndarray,
    scale: np.ndarray,
    min_lp: np.ndarray,
    target_q: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    val_ptr: np.ndarray,
    idx_ptr: np.ndarray,
    rows: np.ndarray,
    rec0: int,
    nll: np.ndarray,
    nll_base: np.ndarray,
    kld: np.ndarray,
    p_diff: np.ndarray,
    same_top: np.ndarray,
    e: np.ndarray,
    r0: int,
    r1: int,
    port: bool,
    with_fma: bool,
) -> None:
    """The KLD pass for rows r0..r1 of the quant's logits x [n, vocab]; row r's base is
    record row rec0 + r. Our records (`rows` empty): scale, min_lp, the target's code and
    the codes (all vocab of them, or the kept ones with their indices). llama-perplexity's
    file (`rows` [m, 4 + vocab (even)] of u16: f32 scale and min log-prob, then the codes).
    ref: perplexity.cpp log_softmax(int, const float *, const uint16_t *, int,
    kl_divergence_result &)"""
    n_vocab = x.shape[1]
    theirs = rows.shape[0] > 0
    imaxs = np.empty(GROUP, np.int64)
    shifted = np.empty(GROUP, np.float32)
    lens = np.zeros(GROUP, np.int64)
    sums = np.empty(GROUP, np.float64)
    no_idx = np.empty(0, np.uint32)
    for g0 in range(r0, r1, GROUP):
        m = min(GROUP, r1 - g0)
        # the quant's side: first argmax, max logit, log-sum-exp
        for g in range(m):
            row = x[g0 + g]
            imax = _first_max(row)
            imaxs[g] = imax
            shifted[g] = row[imax]
            _exp_row(row, row[imax], e[g], port, with_fma)
            lens[g] = n_vocab
        _sums(e, lens, sums)
        # the base's side: terms expf(p) * (p - logit + max_logit + lse) where p > -16
        for g in range(m):
            r = g0 + g
            row = x[r]
            tok = targets[r]
            rr = rec0 + r
            mx = shifted[g]
            lse = F32(math.log(sums[g]))
            if theirs:
                sm = rows[rr, :4].copy().view(np.float32)
                sc = sm[0]
                mlp = sm[1]
                vals = rows[rr, 4 : 4 + n_vocab]
                idx = no_idx
                dense = True
            else:
                sc = scale[rr]
                mlp = min_lp[rr]
                vals = values[val_ptr[rr] : val_ptr[rr + 1]]
                idx = indices[idx_ptr[rr] : idx_ptr[rr + 1]]
                dense = idx.size == 0 and vals.size == n_vocab
            # C reads the target's code from the row; a sparse record keeps it apart
            tq = vals[tok] if dense else target_q[rr]
            v_nll = mx + lse - row[tok]
            v_nll_base = -(sc * F32(tq) + mlp)
            sh = mx + lse
            nll[r] = v_nll
            nll_base[r] = v_nll_base
            if port:
                p_diff[r] = _expf_port(-v_nll, with_fma) - _expf_port(-v_nll_base, with_fma)
            else:
                p_diff[r] = np.exp(-v_nll) - np.exp(-v_nll_base)
            # the base's first largest log-prob over the codes present (a code left out of
            # a sparse record decodes to the row minimum, below every kept one)
            n = vals.size
            pmax = sc * F32(vals[0]) + mlp if n else mlp
            jmax = 0
            for j in range(1, n):
                p = sc * F32(vals[j]) + mlp
                jmax = j if p > pmax else jmax
                pmax = p if p > pmax else pmax  # noqa: FURB136
            imax_base = jmax if dense or n == 0 else np.int64(idx[jmax])
            same_top[r] = imaxs[g] == imax_base
            et = e[g]
            if port:
                for j in range(n):
                    et[j] = _expf_port(sc * F32(vals[j]) + mlp, with_fma)
            else:
                for j in range(n):
                    et[j] = np.exp(sc * F32(vals[j]) + mlp)
            for j in range(n):
                p = sc * F32(vals[j]) + mlp
                i = j if dense else np.int64(idx[j])
                t = et[j] * (p - row[i] + sh)
                # a skipped term as +0.0: the sum starts at +0.0, so adding it changes nothing
                et[j] = t if p > _KLD_FLOOR else F32(0.0)
            lens[g] = n
        for g in range(m, GROUP):
            lens[g] = 0
        _sums(e, lens, sums)
        for g in range(m):
            kld[g0 + g] = sums[g]
