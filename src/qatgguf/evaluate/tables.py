"""The tables of a release: one place builds them for the command
line, the release's Prefect artifacts and the model cards.

- naive against aligned, per model: Model, Method, Disk, 99.9% KLD, Mean KLD, Top-1 %;
- the mobile mixtures, one column per model: size, 2-bit (TQ2_0) tensors, mean KLD
  against the mobile checkpoint's BF16, top-1 %, base PPL.

Pure functions over evaluation results (an `EvalResult` or its dict), file sizes and
tensor type counts; an `EvalTable` holds the cells as text and renders as Markdown.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatgguf.errors import ModelCardError
from qatgguf.evaluate.result import EvalResult

COMPARISON_COLUMNS = ("Model", "Method", "Disk", "99.9% KLD", "Mean KLD", "Top-1 %")


@dataclass(frozen=True)
class EvalTable:
    """A table rendered as given: `rows` hold the cells as text, one per column. `align`
    is "l" or "r" per column (default: the first left, the rest right)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""
    align: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "rows", tuple(tuple(str(c) for c in r) for r in self.rows))
        align = tuple(self.align) or ("l",) + ("r",) * (len(self.columns) - 1)
        object.__setattr__(self, "align", align)
        where = f"table {self.title!r}"
        if not self.columns:
            raise ModelCardError(f"{where}: no columns")
        if len(align) != len(self.columns) or set(align) - {"l", "r"}:
            raise ModelCardError(f"{where}: align needs one 'l' or 'r' per column; got {align}")
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ModelCardError(f"{where}: row {i} has {len(row)} cells for {len(self.columns)} columns")
            for cell in (*row, *self.columns):
                if "\n" in cell or "|" in cell:
                    raise ModelCardError(
                        f"{where}: cell {cell!r} holds a newline or '|', which breaks the Markdown table; reword it")

    @property
    def separator(self) -> str:
        return "|" + "|".join("---:" if a == "r" else "---" for a in self.align) + "|"

    def markdown(self) -> str:
        """The table as GitHub-flavoured Markdown (header, separator, rows)."""
        lines = ["| " + " | ".join(self.columns) + " |", self.separator]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict[str, str]]:
        """One dict per row (a Prefect table artifact's rows)."""
        return [dict(zip(self.columns, r)) for r in self.rows]


@dataclass(frozen=True)
class MethodResult:
    """One evaluated file of a model: what the table calls it, its size on disk (all split
    parts together), its evaluation against the model's BF16 and, when a gate decided,
    whether it passed."""

    method: str
    disk_bytes: int
    result: EvalResult | Mapping[str, Any]
    passed: bool | None = None


@dataclass(frozen=True)
class MobileResult:
    """The mobile mixture file of one model, its TQ2_0 tensor count and its evaluation
    against the BF16 of the mobile checkpoint."""

    disk_bytes: int
    tq2_tensors: int
    result: EvalResult | Mapping[str, Any]
    tq2_note: str = ""


def _get(result: EvalResult | Mapping[str, Any], key: str) -> float:
    value = result[key] if isinstance(result, Mapping) else getattr(result, key)
    value = float(value)
    if not math.isfinite(value):
        raise ModelCardError(f"{key}={value}: the tables hold finite metrics only")
    return value


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
    aligned file first, then the naive ones); a file that failed its gate says so."""
    return [
        {
            "Model": model,
            "Method": m.method + (" (failed the gate)" if m.passed is False else ""),
            "Disk": disk_size(m.disk_bytes),
            "99.9% KLD": fixed(_get(m.result, "kld_99_9"), 4),
            "Mean KLD": fixed(_get(m.result, "mean_kld"), 5),
            "Top-1 %": f"{100 * _get(m.result, 'same_top_p'):.2f}",
        }
        for m in methods
    ]


def comparison_table(rows: Sequence[Mapping[str, str]], *, title: str = "Naive against aligned",
                     note: str = "") -> EvalTable:
    """The naive-against-aligned table of `comparison_rows` (of one model or several)."""
    return EvalTable(title=title, columns=COMPARISON_COLUMNS,
                     rows=tuple(tuple(r[c] for c in COMPARISON_COLUMNS) for r in rows), note=note,
                     align=("l", "l", "r", "r", "r", "r"))


def mobile_rows(columns: Mapping[str, MobileResult]) -> list[dict[str, str]]:
    """The mobile table: one row per quantity, one column per model (e.g. "E2B mobile")."""
    labels = (
        ("Size", lambda r: disk_size(r.disk_bytes)),
        ("2-bit (TQ2_0) tensors", lambda r: f"{r.tq2_tensors}" + (f" ({r.tq2_note})" if r.tq2_note else "")),
        ("Mean KLD vs BF16", lambda r: fixed(_get(r.result, "mean_kld"), 5)),
        ("Top-1 %", lambda r: f"{100 * _get(r.result, 'same_top_p'):.2f}%"),
        ("Base PPL", lambda r: f"{_get(r.result, 'ppl_base'):.1f}"),
    )
    return [{"": label, **{name: fmt(r) for name, r in columns.items()}} for label, fmt in labels]


def mobile_table(columns: Mapping[str, MobileResult], *, note: str = "") -> EvalTable:
    rows = mobile_rows(columns)
    keys = list(rows[0]) if rows else ["", *columns]
    return EvalTable(title="Mobile mixture", columns=tuple(keys), rows=tuple(tuple(r[k] for k in keys) for r in rows),
                     note=note)


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
