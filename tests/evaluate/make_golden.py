"""Record llama-perplexity's KLD summaries on the committed tiny GGUFs as golden files.

    python tests/evaluate/make_golden.py [--tool PATH]

Each golden JSON holds the two commands that made it (base pass, then KLD pass), the
llama.cpp commit, the sha256 of every input and the parsed summary. The tool is built
from the llama-cpp-python 0.3.36 sdist (`qatgguf.evaluate.reference`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from qatgguf.evaluate import default_corpus
from qatgguf.evaluate.reference import (
    build_llama_perplexity,
    common_args,
    find_llama_perplexity,
    parse_kld_summary,
    run_tool,
)

HERE = Path(__file__).parent
MODELS = HERE / "golden" / "models"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# name -> (quant file, ctx, chunks, batch, ubatch, flash_attn, threads)
CASES: dict[str, tuple[str, int, int, int, int, str, int]] = {
    "q4_0-c128-b512-fa_off": ("tiny-q4_0.gguf", 128, 32, 512, 512, "off", 2),
    "q8_0-c128-b512-fa_off": ("tiny-q8_0.gguf", 128, 32, 512, 512, "off", 2),
    "q4_0-c128-b128-fa_on": ("tiny-q4_0.gguf", 128, 32, 128, 512, "on", 2),
    "q4_0-c256-b512-fa_off": ("tiny-q4_0.gguf", 256, 16, 512, 512, "off", 2),
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def kld_commands(
    tool: Path,
    base: Path,
    quant: Path,
    corpus: Path,
    kld_file: Path,
    *,
    ctx: int,
    chunks: int,
    batch: int,
    ubatch: int,
    flash_attn: str,
    threads: int,
) -> tuple[list[str], list[str]]:
    common = common_args(
        ctx=ctx, batch=batch, ubatch=ubatch, flash_attn=flash_attn, threads=threads
    )
    first = [
        "-m",
        str(base),
        "-f",
        str(corpus),
        "--chunks",
        str(chunks),
        *common,
        "--kl-divergence-base",
        str(kld_file),
    ]
    second = ["-m", str(quant), *common, "--kl-divergence-base", str(kld_file), "--kl-divergence"]
    return first, second


def record(tool: Path, name: str) -> dict:
    qfile, ctx, chunks, batch, ubatch, fa, threads = CASES[name]
    base, quant, corpus = MODELS / "tiny-bf16.gguf", MODELS / qfile, default_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        kld = Path(tmp) / "base.kld"
        a, b = kld_commands(
            tool,
            base,
            quant,
            corpus,
            kld,
            ctx=ctx,
            chunks=chunks,
            batch=batch,
            ubatch=ubatch,
            flash_attn=fa,
            threads=threads,
        )
        run_tool(tool, a, must_contain="Final estimate")
        text = run_tool(tool, b, must_contain="Same top p:")
    summary = text[text.index("====== Perplexity statistics") :]
    rel = {
        str(base): "tests/evaluate/golden/models/tiny-bf16.gguf",
        str(quant): f"tests/evaluate/golden/models/{qfile}",
        str(corpus): "src/qatgguf/data/corpus/default.txt",
        str(kld): "base.kld",
        str(tool): "llama-perplexity",
    }
    return {
        "case": name,
        "commands": [
            " ".join(["llama-perplexity", *(rel.get(x, x) for x in args)]) for args in (a, b)
        ],
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "settings": {
            "ctx": ctx,
            "chunks": chunks,
            "batch": batch,
            "ubatch": ubatch,
            "flash_attn": fa,
            "threads": threads,
        },
        "sha256": {"base": _sha(base), "quant": _sha(quant), "corpus": _sha(corpus)},
        "quant_file": qfile,
        "summary": parse_kld_summary(text),
        "summary_text": summary.rstrip().splitlines(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", type=Path, default=None)
    a = ap.parse_args()
    tool = a.tool or find_llama_perplexity() or build_llama_perplexity()
    for name in CASES:
        g = record(tool, name)
        out = HERE / "golden" / f"kld-{name}.json"
        out.write_text(json.dumps(g, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(out, g["summary"]["mean_kld"], g["summary"]["same_top_p"])


if __name__ == "__main__":
    main()
