"""Evaluation metrics as pure functions over numpy arrays.

Every formula follows llama.cpp's `tools/perplexity/perplexity.cpp` (vendored with
llama-cpp-python 0.3.36), including where it works in float32 and where it sums in
float64, so that our numbers are the ones `llama-perplexity --kl-divergence` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Base log-probs at or below this are left out of the KLD sum.
# ref: perplexity.cpp log_softmax(..., kl_divergence_result &) `if (p_log_base > -16.f)`
KLD_LOG_PROB_FLOOR = np.float32(-16.0)
# The 16-bit base record spans at most this many nats below the top logit.
# ref: perplexity.cpp log_softmax(..., uint16_t * log_prob, ...) `max_logit - 16`
RECORD_RANGE = np.float32(16.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of `[n, vocab]` logits, float64 result (exact reference)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(base_log_probs: np.ndarray, quant_log_probs: np.ndarray) -> np.ndarray:
    """KL(base || quant) per row from exact log-probs (float64), >= 0 up to rounding."""
    p = np.exp(base_log_probs)
    return (p * (base_log_probs - quant_log_probs)).sum(axis=-1)


def _row_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, log-sum-exp) per row as perplexity.cpp computes them: expf in float32,
    summed in double, log rounded back to float32."""
    mx = logits.max(axis=1)
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)
    return mx, np.log(sum_exp).astype(np.float32)


@dataclass(frozen=True)
class QuantizedLogProbs:
    """llama.cpp's 16-bit log-prob record of a batch of rows.

    log p[i] = scale * q[i] + min_log_prob, with q = 0 for anything more than 16 nats
    below the top logit. ref: perplexity.cpp log_softmax(int, const float *, uint16_t *, int)
    """

    scale: np.ndarray  # f32 [n]
    min_log_prob: np.ndarray  # f32 [n]
    q: np.ndarray  # u16 [n, vocab]

    def log_probs(self) -> np.ndarray:
        """Decoded base log-probs, float32 [n, vocab], exactly as llama.cpp decodes them."""
        return self.scale[:, None] * self.q.astype(np.float32) + self.min_log_prob[:, None]


def quantize_log_probs(logits: np.ndarray) -> QuantizedLogProbs:
    """Encode `[n, vocab]` float32 logits into llama.cpp's 16-bit log-prob record.

    ref: perplexity.cpp log_softmax(int n_vocab, const float * logits, uint16_t * log_prob, int tok)
    """
    x = np.ascontiguousarray(logits, dtype=np.float32)
    mx, lse = _row_lse(x)
    mn = np.maximum(x.min(axis=1), mx - RECORD_RANGE)
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
    q = np.zeros(x.shape, dtype=np.uint16)
    nz = scale != 0
    if nz.any():
        inv = (np.float32(1.0) / scale[nz]).astype(np.float32)
        xs, mns = x[nz], mn[nz, None]
        # nearest_int() rounds half to even like np.rint; values above 65535 wrap as the
        # C cast to uint16 does. ref: perplexity.cpp nearest_int
        r = np.rint(inv[:, None] * (xs - mns)).astype(np.int64)
        q[nz] = np.where(xs > mns, r, 0).astype(np.uint16)
    return QuantizedLogProbs(scale=scale, min_log_prob=min_log_prob, q=q)


@dataclass(frozen=True)
class TokenValues:
    """Per scored token values, in corpus order; everything the summary needs."""

    nll: np.ndarray  # f32, -log q(target)
    nll_base: np.ndarray  # f32, -log p(target) from the 16-bit base record
    kld: np.ndarray  # f64, KL(base || quant)
    p_diff: np.ndarray  # f32, q(target) - p(target)
    same_top: np.ndarray  # bool, argmax(base) == argmax(quant)

    def __post_init__(self) -> None:
        n = len(self.nll)
        for name in ("nll_base", "kld", "p_diff", "same_top"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"TokenValues.{name} has {len(getattr(self, name))} rows, nll has {n}"
                )

    def __len__(self) -> int:
        return len(self.nll)

    @staticmethod
    def concat(parts: list[TokenValues]) -> TokenValues:
        return TokenValues(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("nll", "nll_base", "kld", "p_diff", "same_top")
            )
        )


def token_values(
    quant_logits: np.ndarray, targets: np.ndarray, base: QuantizedLogProbs
) -> TokenValues:
    """Per-token NLL, base NLL, KLD, Δp and same-top from the quant's float32 logits and
    the base's 16-bit record, in perplexity.cpp's arithmetic.

    ref: perplexity.cpp log_softmax(int, const float *, const uint16_t *, int, kl_divergence_result &)
    """
    x = np.ascontiguousarray(quant_logits, dtype=np.float32)
    n = x.shape[0]
    rows = np.arange(n)
    tgt = np.asarray(targets, dtype=np.int64)
    mx, lse = _row_lse(x)
    imax = x.argmax(axis=1)  # first maximum, as the strict `>` scan
    nll = (mx + lse - x[rows, tgt]).astype(np.float32)
    scale, min_lp = base.scale, base.min_log_prob
    nll_base = (-(scale * base.q[rows, tgt].astype(np.float32) + min_lp)).astype(np.float32)
    p_log_base = base.log_probs()
    imax_base = p_log_base.argmax(axis=1)
    shifted = (mx + lse).astype(np.float32)
    keep = p_log_base > KLD_LOG_PROB_FLOOR
    terms = np.exp(p_log_base) * (p_log_base - x + shifted[:, None])
    kld = np.where(keep, terms, np.float32(0)).sum(axis=1, dtype=np.float64)
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    return TokenValues(
        nll=nll, nll_base=nll_base, kld=kld, p_diff=p_diff, same_top=imax == imax_base
    )


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error from a sum and a sum of squares.

    ref: perplexity.cpp kl_divergence() lambda mean_and_uncertainty
    """
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    """Covariance of the two means. ref: perplexity.cpp kl_divergence() lambda covariance"""
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between order statistics, in float32 as llama.cpp does.

    ref: perplexity.cpp kl_divergence() lambda percentile
    """
    v = np.asarray(sorted_values, dtype=np.float32)
    f = np.float32(fraction)
    if f <= 0:
        return float(v[0])
    if f >= 1:
        return float(v[-1])
    p = np.float32(f * np.float32(len(v) - 1))
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    hi = v[min(ip + 1, len(v) - 1)]
    return float(np.float32((np.float32(1) - p) * v[ip]) + np.float32(p * hi))


def median(sorted_values: np.ndarray) -> float:
    """ref: perplexity.cpp kl_divergence() kld_median: mean of the two middle values (float32)."""
    v = np.asarray(sorted_values, dtype=np.float32)
    n = len(v)
    if n % 2 == 0:
        return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1]))
    return float(v[n // 2])


def proportion_and_uncertainty(hits: int, count: int) -> tuple[float, float]:
    """Share of hits with its binomial standard error sqrt(p(1-p)/(n-1)).

    ref: perplexity.cpp kl_divergence() "Same top p"
    """
    if count < 2:
        return (hits / count if count else 0.0), 0.0
    p = hits / count
    return p, math.sqrt(p * (1.0 - p) / (count - 1))


KLD_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("kld_99_9", 0.999),
    ("kld_99", 0.990),
    ("kld_95", 0.950),
    ("kld_90", 0.900),
    ("kld_10", 0.100),
    ("kld_5", 0.050),
    ("kld_1", 0.010),
    ("kld_0_1", 0.001),
)
P_DIFF_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("dp_99_9", 0.999),
    ("dp_99", 0.990),
    ("dp_95", 0.950),
    ("dp_90", 0.900),
    ("dp_75", 0.750),
    ("dp_25", 0.250),
    ("dp_10", 0.100),
    ("dp_5", 0.050),
    ("dp_1", 0.010),
    ("dp_0_1", 0.001),
)


def summarize(values: TokenValues) -> dict[str, float | int]:
    """Every statistic of llama-perplexity's KLD summary from per-token values.

    Δp values are fractions (llama.cpp prints them ×100 as percent).
    ref: perplexity.cpp kl_divergence(), after the chunk loop
    """
    n = len(values)
    if n == 0:
        raise ValueError("no scored tokens to summarize")
    # The products of float values are float products, rounded before they are summed in
    # double, as C computes `sum_nll2 += nll*nll` and `p_diff2 = p_diff*p_diff` for float
    # nll and p_diff. ref: perplexity.cpp log_softmax(..., kl_divergence_result & kld)
    nll32 = np.asarray(values.nll, dtype=np.float32)
    nll_b32 = np.asarray(values.nll_base, dtype=np.float32)
    pd32 = np.asarray(values.p_diff, dtype=np.float32)
    nll = nll32.astype(np.float64)
    nll_b = nll_b32.astype(np.float64)
    kld = values.kld.astype(np.float64)
    pd = pd32.astype(np.float64)
    pd2 = (pd32 * pd32).astype(np.float64)
    sum_nll2 = (nll32 * nll32).astype(np.float64).sum()
    sum_nll_b2 = (nll_b32 * nll_b32).astype(np.float64).sum()
    sum_cross = (nll32 * nll_b32).astype(np.float64).sum()
    log_ppl, log_ppl_unc = mean_and_uncertainty(nll.sum(), sum_nll2, n)
    log_ppl_b, log_ppl_b_unc = mean_and_uncertainty(nll_b.sum(), sum_nll_b2, n)
    cov = covariance(nll.sum(), nll_b.sum(), sum_cross, n)
    ppl, ppl_b = math.exp(log_ppl), math.exp(log_ppl_b)
    ratio_log = log_ppl - log_ppl_b
    ratio_log_unc = math.sqrt(max(log_ppl_unc**2 + log_ppl_b_unc**2 - 2.0 * cov, 0.0))
    denom = log_ppl_unc * log_ppl_b_unc
    mean_kld, mean_kld_unc = mean_and_uncertainty(kld.sum(), (kld * kld).sum(), n)
    mean_dp, mean_dp_unc = mean_and_uncertainty(pd.sum(), pd2.sum(), n)
    mse, mse_unc = mean_and_uncertainty(pd2.sum(), (pd2 * pd2).sum(), n)
    rms = math.sqrt(mse)
    same, same_unc = proportion_and_uncertainty(int(values.same_top.sum()), n)
    ks = np.sort(values.kld.astype(np.float32))  # llama.cpp keeps float copies for the order stats
    ds = np.sort(values.p_diff.astype(np.float32))
    out: dict[str, float | int] = {
        "n_tokens": n,
        "ppl_quant": ppl,
        "ppl_quant_err": ppl * log_ppl_unc,
        "ppl_base": ppl_b,
        "ppl_base_err": ppl_b * log_ppl_b_unc,
        "ln_ppl_ratio": ratio_log,
        "ln_ppl_ratio_err": ratio_log_unc,
        "ppl_ratio": math.exp(ratio_log),
        "ppl_ratio_err": math.exp(ratio_log) * ratio_log_unc,
        "ppl_diff": ppl - ppl_b,
        "ppl_diff_err": math.sqrt(
            max(
                (ppl * log_ppl_unc) ** 2 + (ppl_b * log_ppl_b_unc) ** 2 - 2.0 * ppl * ppl_b * cov,
                0.0,
            )
        ),
        "ln_ppl_correlation": cov / denom if denom > 0 else 0.0,
        "mean_kld": mean_kld,
        "mean_kld_err": mean_kld_unc,
        "kld_max": float(ks[-1]),
        "kld_median": median(ks),
        "kld_min": float(ks[0]),
        "same_top_p": same,
        "same_top_p_err": same_unc,
        "dp_mean": mean_dp,
        "dp_mean_err": mean_dp_unc,
        "dp_max": float(ds[-1]),
        "dp_median": median(ds),
        "dp_min": float(ds[0]),
        "dp_rms": rms,
        "dp_rms_err": 0.5 / rms * mse_unc if rms > 0 else 0.0,
    }
    for name, frac in KLD_PERCENTILES:
        out[name] = percentile(ks, frac)
    for name, frac in P_DIFF_PERCENTILES:
        out[name] = percentile(ds, frac)
    return out
