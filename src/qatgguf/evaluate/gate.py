"""The release gate: a quant is published only when every threshold holds."""

from __future__ import annotations

from dataclasses import dataclass

from qatgguf.config import GateConfig
from qatgguf.evaluate.result import EvalResult


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]  # one line per failed check; empty when passed
    checks: tuple[tuple[str, float, str, float, bool], ...]  # (metric, value, op, limit, ok)

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "checks": [
                {"metric": m, "value": v, "op": op, "limit": lim, "ok": ok}
                for m, v, op, lim, ok in self.checks
            ],
        }

    def summary(self) -> str:
        if self.passed:
            return "gate PASSED: " + ", ".join(
                f"{m} {v:.6g} {op} {lim:g}" for m, v, op, lim, _ in self.checks
            )
        return "gate FAILED, not published: " + "; ".join(self.reasons)


def apply_gate(result: EvalResult, thresholds: GateConfig) -> GateDecision:
    """Compare an evaluation with the thresholds. NaN metrics fail their check."""
    rules = (
        ("mean_kld", result.mean_kld, "<=", thresholds.max_mean_kld),
        ("kld_99_9", result.kld_99_9, "<=", thresholds.max_kld_99_9),
        ("same_top_p", result.same_top_p, ">=", thresholds.min_same_top_p),
        ("ppl_ratio", result.ppl_ratio, "<=", thresholds.max_ppl_ratio),
    )
    checks, reasons = [], []
    for metric, value, op, limit in rules:
        if limit is None:
            continue
        ok = (value <= limit) if op == "<=" else (value >= limit)  # False for NaN
        checks.append((metric, float(value), op, float(limit), bool(ok)))
        if not ok:
            reasons.append(f"{metric} = {value:.6g}, limit {op} {limit:g}")
    return GateDecision(passed=not reasons, reasons=tuple(reasons), checks=tuple(checks))


def beats_baseline(decision: GateDecision, result: EvalResult, size: int, baseline: EvalResult,
                   baseline_size: int) -> GateDecision:
    """`decision` with the aligned-file rule added: a lower mean KLD than the naive
    baseline's and a file no larger than it (the reason to publish it instead)."""
    checks = [
        ("mean_kld < naive", float(result.mean_kld), "<", float(baseline.mean_kld),
         bool(result.mean_kld < baseline.mean_kld)),
        ("size <= naive", float(size), "<=", float(baseline_size), bool(size <= baseline_size)),
    ]
    reasons = list(decision.reasons)
    for metric, value, op, limit, ok in checks:
        if not ok:
            reasons.append(f"{metric}: {value:.6g} is not {op} the naive file's {limit:.6g}")
    return GateDecision(passed=decision.passed and all(c[4] for c in checks), reasons=tuple(reasons),
                        checks=decision.checks + tuple(checks))
