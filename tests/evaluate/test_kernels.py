"""The evaluation's row kernels against a plain transcription of perplexity.cpp's loops
(libm's own expf through ctypes, Python's double adds in index order): bit for bit."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import struct
from decimal import Decimal, getcontext

import numpy as np
import pytest
from numba import njit

from qatgguf.evaluate import kernels as K
from qatgguf.evaluate import metrics as M

F32 = np.float32
V = 3001  # odd: llama.cpp's file rows pad the vocabulary to an even count


def _libm_expf():  # type: ignore[no-untyped-def]
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype = ctypes.c_float
    libm.expf.argtypes = [ctypes.c_float]
    return libm.expf


EXPF = _libm_expf()


def _f32(v: float) -> F32:
    return F32(v)


def c_encode(row: np.ndarray) -> tuple[F32, F32, np.ndarray]:
    """perplexity.cpp log_softmax(n_vocab, logits, uint16_t * log_prob, tok), line by line."""
    mx = mn = row[0]
    for v in row[1:]:
        mx = v if mx < v else mx  # noqa: FURB136 (C's std::max, as written)
        mn = v if v < mn else mn  # noqa: FURB136
    lim = F32(mx - F32(16))
    mn = lim if mn < lim else mn  # noqa: FURB136
    s = 0.0
    for v in row:
        s += EXPF(float(F32(v - mx)))
    lse = F32(math.log(s))
    mlp = F32(F32(mn - mx) - lse)
    sc = F32(F32(mx - mn) / F32(65535))
    q = np.zeros(row.size, np.uint16)
    if sc:
        inv = F32(F32(1) / sc)
        for i, v in enumerate(row):
            if v > mn:
                f = F32(F32(inv * F32(v - mn)) + F32(12582912.0))
                bits = struct.unpack("<i", struct.pack("<f", f))[0]
                q[i] = ((bits & 0x007FFFFF) - 0x00400000) & 0xFFFF
    return sc, mlp, q


def c_kld(row: np.ndarray, tok: int, sc: F32, mlp: F32, q: np.ndarray) -> tuple:
    """perplexity.cpp log_softmax(n_vocab, logits, base_log_prob, tok, kld), line by line:
    (nll, nll_base, kld, p_diff, same_top)."""
    mx, imax = row[0], 0
    for i in range(1, row.size):
        if row[i] > mx:
            mx, imax = row[i], i
    s = 0.0
    for v in row:
        s += EXPF(float(F32(v - mx)))
    lse = F32(math.log(s))
    nll = F32(F32(mx + lse) - row[tok])
    nll_base = F32(-F32(F32(sc * F32(q[tok])) + mlp))
    shifted = F32(mx + lse)
    kld, imax_base, pmax = 0.0, -1, F32(0)
    for i in range(row.size):
        p = F32(F32(sc * F32(q[i])) + mlp)
        if i == 0 or p > pmax:
            pmax, imax_base = p, i
        if p > F32(-16):
            kld += float(F32(F32(EXPF(float(p))) * F32(F32(p - row[i]) + shifted)))
    p_diff = F32(F32(EXPF(float(-nll))) - F32(EXPF(float(-nll_base))))
    return nll, nll_base, kld, p_diff, imax == imax_base


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = (rng.standard_normal((n, V)) * rng.uniform(0.05, 4.0, (n, 1))).astype(np.float32)
    x[::3, 5] += 25.0  # peaked rows: most codes below the record's floor
    x[1, :] = 0.5  # a constant row: scale 0
    x[2, ::7] = -np.inf  # masked-out tokens
    return x


@njit
def _port_vs_libm(lo: int, hi: int, step: int, with_fma: bool) -> int:
    bad = 0
    for u in range(lo, hi, step):
        x = K._i32_as_f32(np.int32(np.uint32(u)))
        a = K._expf_port(x, with_fma)
        b = np.exp(x)  # a call to libm's expf
        same = K._bits(a) == K._bits(b) or (np.isnan(a) and np.isnan(b))
        bad += 0 if same else 1
    return bad


def test_expf_table_is_its_definition() -> None:
    getcontext().prec = 50
    for i, t in enumerate(K._EXP2_TAB.tolist()):
        exact = Decimal(2) ** (Decimal(i) / 32)
        near = float(exact)
        best = min((math.nextafter(near, -1), near, math.nextafter(near, 2)),
                   key=lambda c: abs(Decimal(c) - exact))  # fmt: skip
        bits = struct.unpack("<Q", struct.pack("<d", best))[0]
        assert (bits - (i << 47)) % 2**64 == t, i


def test_expf_port_equals_libm() -> None:
    assert K.expf_matches_libm()
    # every 61st float32 bit pattern: all binades, both signs, NaN, Inf, subnormals
    assert _port_vs_libm(0, 1 << 32, 61, K.WITH_FMA) == 0
    # every float in [-17, 0], the range the KLD terms and most logits take
    lo = struct.unpack("<I", struct.pack("<f", -0.0))[0]
    hi = struct.unpack("<I", struct.pack("<f", -17.0))[0]
    assert _port_vs_libm(lo, hi + 1, 7, K.WITH_FMA) == 0


@pytest.mark.parametrize("port", [True, False], ids=["port", "libm"])
def test_encode_rows_equal_the_c_loop(port: bool) -> None:
    rng = np.random.default_rng(0)
    n = 9  # two full groups of rows and one partial
    x = _rows(rng, n)
    tg = rng.integers(0, V, n)
    scale, mlp = np.empty(n, F32), np.empty(n, F32)
    tq, kept = np.empty(n, np.uint16), np.empty(n, np.int64)
    q = np.empty((n, V), np.uint16)
    cap = V // 3 + 1
    idx, val = np.empty((n, cap), np.uint32), np.empty((n, cap), np.uint16)
    K.encode_rows(x, tg, scale, mlp, tq, kept, q, idx, val, K.scratch(V), 0, n, port, K.WITH_FMA)
    for r in range(n):
        sc, ml, qq = c_encode(x[r])
        assert scale[r].tobytes() == sc.tobytes() and mlp[r].tobytes() == ml.tobytes(), r
        assert np.array_equal(q[r], qq), r
        assert tq[r] == qq[tg[r]]
        lp = M.QuantizedLogProbs(scale[r : r + 1], mlp[r : r + 1], qq[None]).log_probs()[0]
        keep = np.where(qq > 0, lp > F32(-16.5), ml > F32(-16))
        assert kept[r] == keep.sum(), r
        if kept[r] * 6 < 2 * V:
            k = int(kept[r])
            assert np.array_equal(idx[r, :k], np.flatnonzero(keep))
            assert np.array_equal(val[r, :k], qq[keep])
    assert (kept * 6 < 2 * V).any() and (kept * 6 >= 2 * V).any()  # both layouts seen


@pytest.mark.parametrize("port", [True, False], ids=["port", "libm"])
def test_kld_rows_equal_the_c_loop_for_every_record_layout(port: bool) -> None:
    rng = np.random.default_rng(1)
    n = 7
    base = _rows(rng, n)
    quant = (base + rng.standard_normal(base.shape).astype(F32) * F32(0.3)).astype(F32)
    quant[4] = base[4]  # identical logits: KL 0, same top
    tg = rng.integers(0, V, n)
    enc = [c_encode(base[r]) for r in range(n)]
    scale = np.array([e[0] for e in enc], F32)
    mlp = np.array([e[1] for e in enc], F32)
    q = np.stack([e[2] for e in enc])
    tq = q[np.arange(n), tg]
    want = [c_kld(quant[r], int(tg[r]), scale[r], mlp[r], q[r]) for r in range(n)]

    def run(*rec: np.ndarray) -> list[np.ndarray]:
        out = [np.empty(n, F32), np.empty(n, F32), np.empty(n), np.empty(n, F32),
               np.empty(n, np.bool_)]  # fmt: skip
        K.kld_rows(quant, tg, *rec, 0, *out, K.scratch(V), 0, n, port, K.WITH_FMA)
        return out

    # our record, every row sparse where it can be: the kept codes and their indices
    lp = M.QuantizedLogProbs(scale, mlp, q).log_probs()
    keep = np.where(q > 0, lp > F32(-16.5), (mlp > F32(-16))[:, None])
    sparse = [np.flatnonzero(keep[r]).astype(np.uint32) for r in range(n)]
    vals = np.concatenate([q[r, sparse[r]] for r in range(n)])
    ptr = np.concatenate([[0], np.cumsum([len(s) for s in sparse])]).astype(np.int64)
    no_rows = np.zeros((0, 0), np.uint16)
    got_sparse = run(scale, mlp, tq, vals, np.concatenate(sparse), ptr, ptr, no_rows)
    # our record, every row dense
    dense_ptr = np.arange(n + 1, dtype=np.int64) * V
    got_dense = run(scale, mlp, tq, q.reshape(-1), np.zeros(0, np.uint32), dense_ptr,
                    np.zeros(n + 1, np.int64), no_rows)  # fmt: skip
    # llama-perplexity's file rows: f32 scale and min, then the codes, padded to even
    nv = 2 * ((V + 1) // 2) + 4
    rows = np.zeros((n, nv), np.uint16)
    rows[:, :4] = np.stack([scale, mlp], axis=1).view(np.uint16)
    rows[:, 4 : 4 + V] = q
    e16, e32 = np.zeros(0, np.uint16), np.zeros(0, np.uint32)
    ef, ei = np.zeros(0, F32), np.zeros(0, np.int64)
    got_theirs = run(ef, ef, e16, e16, e32, ei, ei, rows)
    for got in (got_sparse, got_dense, got_theirs):
        for r in range(n):
            nll, nll_base, kld, p_diff, same = want[r]
            assert got[0][r].tobytes() == nll.tobytes(), r
            assert got[1][r].tobytes() == nll_base.tobytes(), r
            assert got[2][r] == kld, r
            assert got[3][r].tobytes() == p_diff.tobytes(), r
            assert got[4][r] == same, r
    # identical logits: KL zero up to the record's rounding (steps of 16/65535 nats)
    assert abs(got_sparse[2][4]) < 1e-4 and got_sparse[4][4]


def test_token_values_of_the_kernels_and_of_metrics_agree() -> None:
    # metrics.token_values (numpy's exp, pairwise double sums) is the reference for what
    # the numbers mean; the kernels give the tool's last bits, so within float32 rounding
    rng = np.random.default_rng(2)
    n = 12
    base = np.ascontiguousarray(_rows(rng, n)[:, :-1])
    base[2] = 0.25  # numpy's reference has no rule for -inf codes
    quant = (base + rng.standard_normal(base.shape).astype(F32) * F32(0.3)).astype(F32)
    v = base.shape[1]
    tg = rng.integers(0, v, n)
    rec = M.quantize_log_probs(base)
    ref = M.token_values(quant, tg, rec)
    out = [np.empty(n, F32), np.empty(n, F32), np.empty(n), np.empty(n, F32), np.empty(n, np.bool_)]
    tq = rec.q[np.arange(n), tg]
    ptr = np.arange(n + 1, dtype=np.int64) * v
    K.kld_rows(quant, tg, rec.scale, rec.min_log_prob, tq, rec.q.reshape(-1),
               np.zeros(0, np.uint32), ptr, np.zeros(n + 1, np.int64), np.zeros((0, 0), np.uint16),
               0, *out, K.scratch(v), 0, n, True, K.WITH_FMA)  # fmt: skip
    assert np.allclose(out[0], ref.nll, rtol=1e-6, atol=1e-6)
    assert np.allclose(out[1], ref.nll_base, rtol=1e-6, atol=1e-6)
    assert np.allclose(out[2], ref.kld, rtol=1e-5, atol=1e-7)
    assert np.allclose(out[3], ref.p_diff, atol=1e-6)
    assert np.array_equal(out[4], ref.same_top)
