"""The real `llama-perplexity` as a reference: build it from the llama-cpp-python source
distribution, run it, and parse its summary. Used by tests and bench/, not by releases.

The tool exits 0 even on errors and may lose its last lines (its async log is not
flushed at exit; llamacpp-runtime.md §5), so a run without the summary is retried and
then reported as an error with the output's tail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from qatgguf.errors import EvaluationError

SDIST_VERSION = "0.3.36"
_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
)


def tools_dir() -> Path:
    return Path(os.environ.get("QATGGUF_CACHE", Path.home() / ".cache" / "qatgguf")) / "llama-tools"


def find_llama_perplexity() -> Path | None:
    """$QATGGUF_LLAMA_PERPLEXITY, else a previous build in the cache, else PATH."""
    env = os.environ.get("QATGGUF_LLAMA_PERPLEXITY")
    if env and Path(env).is_file():
        return Path(env)
    built = tools_dir() / "build" / "bin" / "llama-perplexity"
    if built.is_file():
        return built
    found = shutil.which("llama-perplexity")
    return Path(found) if found else None


def build_llama_perplexity(src: Path | None = None, *, jobs: int = 2) -> Path:
    """Build only the `llama-perplexity` target (static) from the llama.cpp that
    llama-cpp-python's sdist vendors; `src` is that llama.cpp folder, downloaded with pip
    into the cache when not given. Minutes on two cores."""
    root = tools_dir()
    if src is None:
        sdist_dir = root / "sdist"
        src = sdist_dir / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
        if not src.is_dir():
            sdist_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={SDIST_VERSION}",
                    "-d",
                    str(sdist_dir),
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                ["tar", "xzf", f"llama_cpp_python-{SDIST_VERSION}.tar.gz"],
                cwd=sdist_dir,
                check=True,
            )
    build = root / "build"
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build), *_CMAKE_FLAGS], check=True, capture_output=True
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-perplexity", "-j", str(jobs)],
        check=True,
        capture_output=True,
    )
    return build / "bin" / "llama-perplexity"


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
            [str(tool), *args], capture_output=True, text=True, timeout=timeout, check=False
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
