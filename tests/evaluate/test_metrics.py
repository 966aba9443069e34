"""Metrics: properties and hand-computed values (pure numpy, no llama.cpp)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qatgguf.evaluate import metrics as M


def _logits(rng: np.random.Generator, n: int, v: int, spread: float = 4.0) -> np.ndarray:
    return (rng.standard_normal((n, v)) * spread).astype(np.float32)


def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_nonnegative() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = _logits(rng, 8, 300), _logits(rng, 8, 300)
        la, lb = M.log_softmax(a), M.log_softmax(b)
        assert np.allclose(M.kl_divergence(la, la), 0.0, atol=1e-12)
        assert (M.kl_divergence(la, lb) >= -1e-12).all()
        assert (M.kl_divergence(la, lb) > 1e-3).all()


def test_kl_hand_computed() -> None:
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]]))
    assert M.kl_divergence(p, q)[0] == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12
    )


def test_token_values_with_identical_logits() -> None:
    rng = np.random.default_rng(1)
    x = _logits(rng, 40, 512)
    tgt = rng.integers(0, 512, 40)
    tv = M.token_values(x, tgt, M.quantize_log_probs(x))
    # KL(p, p) through the 16-bit record is zero up to its rounding (step 16/65535 nats)
    assert np.abs(tv.kld).max() < 1e-4
    assert tv.same_top.all()
    # the record clamps log-probs 16 nats below the top: compare targets inside that range
    inside = x[np.arange(40), tgt] > x.max(1) - 15.99
    assert inside.sum() > 10
    assert np.allclose(tv.nll[inside], tv.nll_base[inside], atol=2e-4)
    assert (tv.nll_base[~inside] <= tv.nll[~inside] + 2e-4).all()
    assert np.abs(tv.p_diff).max() < 1e-4


def test_token_values_match_exact_float_metrics() -> None:
    rng = np.random.default_rng(2)
    base = _logits(rng, 64, 1000)
    quant = base + _logits(rng, 64, 1000, spread=0.3)
    tgt = rng.integers(0, 1000, 64)
    tv = M.token_values(quant, tgt, M.quantize_log_probs(base))
    lb, lq = M.log_softmax(base), M.log_softmax(quant)
    exact = M.kl_divergence(lb, lq)
    # only terms with log p_base <= -16 are dropped, and the record rounds log p to 16/65535
    assert np.allclose(tv.kld, exact, rtol=1e-3, atol=5e-5)
    assert (tv.kld >= -1e-7).all()
    assert np.array_equal(tv.same_top, lb.argmax(1) == lq.argmax(1))
    assert np.allclose(tv.nll, -lq[np.arange(64), tgt], rtol=1e-5, atol=1e-5)
    inside = base[np.arange(64), tgt] > base.max(1) - 15.99
    assert np.allclose(tv.nll_base[inside], -lb[np.arange(64), tgt][inside], atol=3e-4)


def test_quantize_log_probs_layout() -> None:
    x = np.array([[0.0, 1.0, 2.0, -30.0]], dtype=np.float32)
    r = M.quantize_log_probs(x)
    lse = math.log(1 + math.exp(-1) + math.exp(-2) + math.exp(-32))
    # min logit is clamped to max - 16 = -14; scale spans 16 nats over 65535 steps
    assert r.scale[0] == pytest.approx(16 / 65535, rel=1e-6)
    assert r.min_log_prob[0] == pytest.approx(-14 - 2 - lse, rel=1e-6)
    assert r.q[0, 3] == 0 and r.q[0, 2] == 65535
    assert r.log_probs()[0, :3] == pytest.approx([-2 - lse, -1 - lse, -lse], abs=2e-4)


def test_percentile_and_median_interpolate_like_llama_cpp() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert M.percentile(v, 0.5) == pytest.approx(2.5)
    assert M.percentile(v, 0.0) == 1.0 and M.percentile(v, 1.0) == 4.0
    assert M.percentile(v, 0.999) == pytest.approx(3.997, rel=1e-6)  # p = 0.999 * 3 = 2.997
    assert M.median(v) == 2.5 and M.median(v[:3]) == 2.0


def test_mean_and_uncertainty_and_covariance() -> None:
    x = np.arange(1.0, 21.0)
    m, e = M.mean_and_uncertainty(x.sum(), (x * x).sum(), len(x))
    assert m == pytest.approx(10.5)
    # llama.cpp: sqrt((E[x^2] - E[x]^2) / (n - 1)) = population std / sqrt(n - 1)
    assert e == pytest.approx(x.std() / math.sqrt(len(x) - 1))
    assert M.mean_and_uncertainty(5.0, 25.0, 5) == (1.0, 0.0)  # n <= 10: no uncertainty
    assert M.covariance(x.sum(), x.sum(), (x * x).sum(), len(x)) == pytest.approx(
        x.var() / (len(x) - 1)
    )
    p, pe = M.proportion_and_uncertainty(90, 101)
    assert p == pytest.approx(90 / 101) and pe == pytest.approx(math.sqrt(p * (1 - p) / 100))


def test_summarize_is_independent_of_how_values_are_split() -> None:
    rng = np.random.default_rng(3)
    base = _logits(rng, 300, 200)
    quant = base + _logits(rng, 300, 200, spread=0.5)
    tgt = rng.integers(0, 200, 300)
    whole = M.token_values(quant, tgt, M.quantize_log_probs(base))
    parts = [
        M.token_values(quant[a:b], tgt[a:b], M.quantize_log_probs(base[a:b]))
        for a, b in ((0, 77), (77, 300))
    ]
    assert M.summarize(M.TokenValues.concat(parts)) == M.summarize(whole)
    s = M.summarize(whole)
    assert s["n_tokens"] == 300
    assert s["kld_min"] <= s["kld_1"] <= s["kld_median"] <= s["kld_99_9"] <= s["kld_max"]
    assert s["ppl_ratio"] == pytest.approx(s["ppl_quant"] / s["ppl_base"])
    assert 0 < s["same_top_p"] < 1
