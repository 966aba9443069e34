"""Evaluation of a quantized GGUF against its base: llama.cpp logits, the metrics of
`llama-perplexity --kl-divergence`, compact base records and the release gate."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from qatgguf.evaluate.gate import GateDecision, apply_gate, beats_baseline
from qatgguf.evaluate.base import compute_base_records, record_key
from qatgguf.evaluate.chunks import count_chunks, plan_chunk_ranges
from qatgguf.evaluate.export import export_llamacpp
from qatgguf.evaluate.ranges import RangeValues, evaluate_chunks
from qatgguf.evaluate.records import BaseRecords, RecordKey
from qatgguf.evaluate.result import EvalResult, evaluate, merge
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
