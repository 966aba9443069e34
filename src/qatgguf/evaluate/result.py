"""An evaluation's numbers (`EvalResult`, printed like llama-perplexity), the exact
merge of chunk ranges, and `evaluate`, the whole evaluation in one call."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from qatgguf.errors import EvaluationError
from qatgguf.evaluate.base import Digests, write_base_records
from qatgguf.evaluate.metrics import TokenValues, summarize
from qatgguf.evaluate.ranges import RangeValues, evaluate_chunk_range
from qatgguf.evaluate.runner import RunnerSettings


@dataclass(frozen=True)
class EvalResult:
    """The evaluation of one quant against its base; `to_dict()` is the JSON the CLI prints."""

    mean_kld: float
    mean_kld_err: float
    kld_max: float
    kld_99_9: float
    kld_99: float
    kld_95: float
    kld_90: float
    kld_median: float
    kld_10: float
    kld_5: float
    kld_1: float
    kld_0_1: float
    kld_min: float
    same_top_p: float
    same_top_p_err: float
    ppl_base: float
    ppl_base_err: float
    ppl_quant: float
    ppl_quant_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    ln_ppl_correlation: float
    dp_mean: float
    dp_mean_err: float
    dp_rms: float
    dp_rms_err: float
    dp_max: float
    dp_99_9: float
    dp_99: float
    dp_95: float
    dp_90: float
    dp_75: float
    dp_median: float
    dp_25: float
    dp_10: float
    dp_5: float
    dp_1: float
    dp_0_1: float
    dp_min: float
    n_tokens: int
    n_chunks: int
    ctx: int
    base_size: int | None
    quant_size: int
    base_sha256: str | None
    quant_sha256: str
    corpus_sha256: str | None

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)

    def format_table(self) -> str:
        """The summary in llama-perplexity's layout (Δp in percent)."""
        pct = 100.0
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl_quant:10.6f} ± {self.ppl_quant_err:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_err:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {pct * self.ln_ppl_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ppl_ratio:10.6f} ± {self.ln_ppl_ratio_err:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {self.ppl_ratio:10.6f} ± {self.ppl_ratio_err:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {self.ppl_diff:10.6f} ± {self.ppl_diff_err:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.mean_kld:10.6f} ± {self.mean_kld_err:10.6f}",
            f"Maximum KLD: {self.kld_max:10.6f}",
            f"99.9%   KLD: {self.kld_99_9:10.6f}",
            f"99.0%   KLD: {self.kld_99:10.6f}",
            f"95.0%   KLD: {self.kld_95:10.6f}",
            f"90.0%   KLD: {self.kld_90:10.6f}",
            f"Median  KLD: {self.kld_median:10.6f}",
            f"10.0%   KLD: {self.kld_10:10.6f}",
            f" 5.0%   KLD: {self.kld_5:10.6f}",
            f" 1.0%   KLD: {self.kld_1:10.6f}",
            f" 0.1%   KLD: {self.kld_0_1:10.6f}",
            f"Minimum KLD: {self.kld_min:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {pct * self.dp_mean:6.3f} ± {pct * self.dp_mean_err:5.3f} %",
            f"Maximum Δp: {pct * self.dp_max:6.3f}%",
            f"99.9%   Δp: {pct * self.dp_99_9:6.3f}%",
            f"99.0%   Δp: {pct * self.dp_99:6.3f}%",
            f"95.0%   Δp: {pct * self.dp_95:6.3f}%",
            f"90.0%   Δp: {pct * self.dp_90:6.3f}%",
            f"75.0%   Δp: {pct * self.dp_75:6.3f}%",
            f"Median  Δp: {pct * self.dp_median:6.3f}%",
            f"25.0%   Δp: {pct * self.dp_25:6.3f}%",
            f"10.0%   Δp: {pct * self.dp_10:6.3f}%",
            f" 5.0%   Δp: {pct * self.dp_5:6.3f}%",
            f" 1.0%   Δp: {pct * self.dp_1:6.3f}%",
            f" 0.1%   Δp: {pct * self.dp_0_1:6.3f}%",
            f"Minimum Δp: {pct * self.dp_min:6.3f}%",
            f"RMS Δp    : {pct * self.dp_rms:6.3f} ± {pct * self.dp_rms_err:5.3f} %",
            f"Same top p: {pct * self.same_top_p:6.3f} ± {pct * self.same_top_p_err:5.3f} %",
            "",
            (
                f"scored tokens: {self.n_tokens} in {self.n_chunks} chunks of {self.ctx}; "
                f"sizes: base {self.base_size} B, quant {self.quant_size} B"
            ),
        ]
        return "\n".join(lines)


def merge(stats: Sequence[RangeValues]) -> EvalResult:
    """Join range results into one EvalResult. Exact: per-token values are concatenated in
    chunk order and every statistic is computed once over all of them, so the result does
    not depend on how the chunks were split. Raises EvaluationError on gaps, overlaps or
    results of different files."""
    if not stats:
        raise EvaluationError("merge: no chunk results given")
    s = sorted(stats, key=lambda c: c.chunk_start)
    ident = {(c.ctx, c.n_vocab, c.base_sha256, c.corpus_sha256, c.quant_sha256) for c in s}
    if len(ident) != 1:
        raise EvaluationError(
            f"merge: chunk results come from different evaluations (ctx, vocab, base, corpus, quant): {sorted(map(str, ident))}"
        )
    for prev, cur in itertools.pairwise(s):
        if cur.chunk_start != prev.chunk_end:
            raise EvaluationError(
                f"merge: chunk ranges [{prev.chunk_start}, {prev.chunk_end}) and [{cur.chunk_start}, {cur.chunk_end}) "
                "leave a gap or overlap; evaluate each chunk exactly once"
            )
    values = TokenValues.concat([c.values for c in s])
    summary = summarize(values)
    c0 = s[0]
    return EvalResult(
        **summary,
        n_chunks=s[-1].chunk_end - c0.chunk_start,
        ctx=c0.ctx,
        base_size=c0.base_size,
        quant_size=c0.quant_size,
        base_sha256=c0.base_sha256,
        quant_sha256=c0.quant_sha256,
        corpus_sha256=c0.corpus_sha256,
    )


def evaluate(
    base: Path,
    quant: Path,
    corpus: Path,
    *,
    ctx: int,
    chunks: int | None = None,
    workdir: Path | None = None,
    settings: RunnerSettings | None = None,
) -> EvalResult:
    """Everything in-process: base records (reused from `workdir` when present), the quant's
    evaluation and the summary. Raises EvaluationError."""
    settings = settings or RunnerSettings()
    base, quant, corpus = Path(base), Path(quant), Path(corpus)
    # All three digests start now, on one thread: most of the hashing then runs while the
    # process imports, loads the models and tokenizes, which keep one core busy; both
    # are needed only when the record's key and the result are written (without a
    # workdir nothing is reused, so the key can wait until the record is written).
    digests = Digests(base=(base, None), quant=(quant, None), corpus=(corpus, None))
    with tempfile.TemporaryDirectory(prefix="qatgguf-eval-") as tmp:
        rec = write_base_records(
            base, corpus, ctx=ctx, chunk_range=None, chunks=chunks, settings=settings,
            out=None if workdir else Path(tmp) / "base.qgkl",
            workdir=Path(workdir) if workdir else None, digests=digests,
        )  # fmt: skip
        stats = evaluate_chunk_range(
            quant, rec, chunk_range=None, settings=settings, n_threads=None,
            n_gpu_layers=None, digests=digests,
        )  # fmt: skip
        return merge([stats])
