"""The real `llama-perplexity` as a reference: run it (built by `qatgguf.llamacpp` from the
installed llama-cpp-python's sources, against its libraries) and parse its summary.

The tool exits 0 even on errors and may lose its last lines (ref: common/log.cpp: the log
is written by a worker thread that main() does not join before exit), so a run without
the summary is retried and then reported as an error with the output's tail.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from qatgguf.errors import EvaluationError
from qatgguf.llamacpp import tool_env


def llama_perplexity() -> Path:
    """The `llama-perplexity` of the installed llama.cpp, built on first use
    (`qatgguf.llamacpp.ensure_tools`) and run against the installed libraries."""
    from qatgguf.llamacpp import ensure_tools

    return ensure_tools()["llama-perplexity"]


_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_PATTERNS: dict[str, str] = {
    "ppl_quant": rf"Mean PPL\(Q\)\s+:\s+{_NUM} ± +{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s+:\s+{_NUM} ± +{_NUM}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s+:\s+{_NUM} ± +{_NUM}",
    "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+{_NUM} ± +{_NUM}",
    "mean_kld": rf"Mean    KLD:\s+{_NUM} ± +{_NUM}",
    "kld_max": rf"Maximum KLD:\s+{_NUM}",
    "kld_99_9": rf"99\.9%   KLD:\s+{_NUM}",
    "kld_99": rf"99\.0%   KLD:\s+{_NUM}",
    "kld_95": rf"95\.0%   KLD:\s+{_NUM}",
    "kld_90": rf"90\.0%   KLD:\s+{_NUM}",
    "kld_median": rf"Median  KLD:\s+{_NUM}",
    "kld_10": rf"10\.0%   KLD:\s+{_NUM}",
    "kld_5": rf" 5\.0%   KLD:\s+{_NUM}",
    "kld_1": rf" 1\.0%   KLD:\s+{_NUM}",
    "kld_0_1": rf" 0\.1%   KLD:\s+{_NUM}",
    "kld_min": rf"Minimum KLD:\s+{_NUM}",
    "dp_mean": rf"Mean    Δp:\s+{_NUM} ± +{_NUM} %",
    "dp_max": rf"Maximum Δp:\s+{_NUM}%",
    "dp_99_9": rf"99\.9%   Δp:\s+{_NUM}%",
    "dp_median": rf"Median  Δp:\s+{_NUM}%",
    "dp_0_1": rf" 0\.1%   Δp:\s+{_NUM}%",
    "dp_min": rf"Minimum Δp:\s+{_NUM}%",
    "dp_rms": rf"RMS Δp    :\s+{_NUM} ± +{_NUM} %",
    "same_top_p": rf"Same top p:\s+{_NUM} ± +{_NUM} %",
}
_PERCENT = {"dp_mean", "dp_max", "dp_99_9", "dp_median", "dp_0_1", "dp_min", "dp_rms", "same_top_p"}


def parse_kld_summary(text: str) -> dict[str, float]:
    """The summary numbers of a `--kl-divergence` run, in EvalResult's names and units
    (fractions, not percent). Raises EvaluationError when the summary is incomplete."""
    out: dict[str, float] = {}
    for name, pat in _PATTERNS.items():
        m = re.search(pat, text)
        if not m:
            raise EvaluationError(
                f"llama-perplexity output has no {name!r} line; tail:\n{text[-2000:]}"
            )
        scale = 0.01 if name in _PERCENT else 1.0
        out[name] = float(m.group(1)) * scale
        if m.lastindex and m.lastindex > 1:
            out[name + "_err"] = float(m.group(2)) * scale
    return out


def run_tool(
    tool: Path, args: list[str], *, must_contain: str, retries: int = 3, timeout: float = 1800
) -> str:
    """Run the tool, return stdout+stderr; retry when `must_contain` is missing (lost log lines)."""
    text = ""
    for _ in range(retries):
        p = subprocess.run(
            [str(tool), *args], capture_output=True, text=True, timeout=timeout, check=False,
            env=tool_env(),
        )
        text = p.stdout + p.stderr
        if p.returncode == 0 and must_contain in text:
            return text
    raise EvaluationError(
        f"{tool} {' '.join(args)}: no {must_contain!r} in its output after {retries} runs; tail:\n{text[-3000:]}"
    )


def common_args(*, ctx: int, batch: int, ubatch: int, flash_attn: str, threads: int) -> list[str]:
    return [
        "-c",
        str(ctx),
        "-b",
        str(batch),
        "-ub",
        str(ubatch),
        "-fa",
        flash_attn,
        "-t",
        str(threads),
        "-tb",
        str(threads),
    ]
