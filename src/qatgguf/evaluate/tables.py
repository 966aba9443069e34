"""The two tables of the QAT analysis:

- naive against aligned, per model: Model, Method, Disk, 99.9% KLD, Mean KLD, Top-1 %;
- the mobile mixtures, one column per model: size, 2-bit (TQ2_0) tensors, mean KLD
  against the mobile checkpoint's BF16, top-1 %, base PPL.

Pure functions over `EvalResult`s, file sizes and tensor type counts; `markdown` renders
either table.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qatgguf.evaluate.records import EvalResult

COMPARISON_COLUMNS = ("Model", "Method", "Disk", "99.9% KLD", "Mean KLD", "Top-1 %")


@dataclass(frozen=True)
class MethodResult:
    """One evaluated file of a model: what the table calls it, its size on disk (all
    split parts together) and its evaluation against the model's BF16."""

    method: str
    disk_bytes: int
    result: EvalResult


@dataclass(frozen=True)
class MobileResult:
    """The mobile mixture file of one model, its TQ2_0 tensor count and its evaluation
    against the BF16 of the mobile checkpoint."""

    disk_bytes: int
    tq2_tensors: int
    result: EvalResult


def disk_size(nbytes: int) -> str:
    """Bytes as the tables print them: GB from 1e9 bytes on, else MB (decimal units)."""
    if nbytes >= 1_000_000_000:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB"


def fixed(value: float, decimals: int) -> str:
    """`value` with at least `decimals` decimals and at least 3 significant digits: the
    tiny family's KLDs sit far below the real models', where 5 decimals show nothing."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.{decimals}f}"
    return f"{value:.{max(decimals, 2 - math.floor(math.log10(abs(value))))}f}"


def comparison_rows(model: str, methods: Sequence[MethodResult]) -> list[dict[str, str]]:
    """Rows of the naive-against-aligned table for one model, in the order given (the
    aligned file first, then the naive ones)."""
    return [
        {
            "Model": model,
            "Method": m.method,
            "Disk": disk_size(m.disk_bytes),
            "99.9% KLD": fixed(m.result.kld_99_9, 4),
            "Mean KLD": fixed(m.result.mean_kld, 5),
            "Top-1 %": f"{100 * m.result.same_top_p:.2f}",
        }
        for m in methods
    ]


def mobile_rows(columns: Mapping[str, MobileResult]) -> list[dict[str, str]]:
    """The mobile table: one row per quantity, one column per model (e.g. "E2B mobile")."""
    labels = (
        ("Size", lambda r: disk_size(r.disk_bytes)),
        ("2-bit (TQ2_0) tensors", lambda r: str(r.tq2_tensors)),
        ("Mean KLD vs BF16", lambda r: fixed(r.result.mean_kld, 5)),
        ("Top-1 %", lambda r: f"{100 * r.result.same_top_p:.2f}%"),
        ("Base PPL", lambda r: f"{r.result.ppl_base:.1f}"),
    )
    return [{"": label, **{name: fmt(r) for name, r in columns.items()}} for label, fmt in labels]


def markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """A GitHub markdown table of rows that share their keys (the first row's order)."""
    if not rows:
        return ""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "|".join(" --- " for _ in keys) + "|"]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out) + "\n"


def tensor_types(paths: Sequence[str | Path]) -> Counter[str]:
    """How many tensors of each GGML type the GGUF file (all its split parts) holds."""
    from gguf import GGUFReader

    counts: Counter[str] = Counter()
    for p in paths:
        counts.update(t.tensor_type.name for t in GGUFReader(str(p)).tensors)
    return counts
