"""Evaluation of a quantized GGUF against its base: llama.cpp logits, the metrics of
`llama-perplexity --kl-divergence`, compact base records and the release gate."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from qatgguf.evaluate.gate import GateDecision, apply_gate, beats_baseline
from qatgguf.evaluate.records import (
    BaseRecords,
    RangeValues,
    EvalResult,
    RecordKey,
    compute_base_records,
    count_chunks,
    evaluate,
    evaluate_chunks,
    export_llamacpp,
    merge,
    plan_chunk_ranges,
    record_key,
)
from qatgguf.evaluate.runner import RunnerSettings


def default_corpus() -> Path:
    """The evaluation corpus shipped with qatgguf (see data/corpus/PROVENANCE.md)."""
    return Path(str(files("qatgguf") / "data" / "corpus" / "default.txt"))


__all__ = [
    "BaseRecords",
    "RangeValues",
    "EvalResult",
    "GateDecision",
    "RecordKey",
    "RunnerSettings",
    "apply_gate",
    "beats_baseline",
    "compute_base_records",
    "count_chunks",
    "default_corpus",
    "evaluate",
    "evaluate_chunks",
    "export_llamacpp",
    "merge",
    "plan_chunk_ranges",
    "record_key",
]
