"""Evaluation with real llama.cpp on the committed tiny GGUFs, checked against the real
`llama-perplexity` run on this machine, with the same kernels (the installed libraries).
llama.cpp's last digits depend on the CPU's instruction set, so no number recorded on
another machine is an oracle here; only the input files are committed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qatgguf.errors import EvaluationError
from qatgguf.evaluate import (
    RunnerSettings,
    compute_base_records,
    count_chunks,
    default_corpus,
    evaluate,
    evaluate_chunks,
    export_llamacpp,
    merge,
    plan_chunk_ranges,
)
from qatgguf.evaluate.records import BaseRecords
from qatgguf.evaluate.reference import common_args, parse_kld_summary, run_tool

pytest.importorskip("llama_cpp")

HERE = Path(__file__).parent
MODELS = HERE / "golden" / "models"
BASE = MODELS / "tiny-bf16.gguf"

# name -> (quant file, ctx, chunks, batch, ubatch, flash_attn, threads)
CASES: dict[str, tuple[str, int, int, int, int, str, int]] = {
    "q4_0-c128-b512-fa_off": ("tiny-q4_0.gguf", 128, 32, 512, 512, "off", 2),
    "q8_0-c128-b512-fa_off": ("tiny-q8_0.gguf", 128, 32, 512, 512, "off", 2),
    "q4_0-c128-b128-fa_on": ("tiny-q4_0.gguf", 128, 32, 128, 512, "on", 2),
    "q4_0-c256-b512-fa_off": ("tiny-q4_0.gguf", 256, 16, 512, 512, "off", 2),
}


def assert_matches_tool(ours: dict, tool: dict) -> None:
    """The agreement bounds (PPL 0.1%, mean and 99.9% KLD 1%, same top p 0.05 points);
    the tool prints 6 decimals, so allow one unit of its last digit."""
    assert ours["ppl_quant"] == pytest.approx(tool["ppl_quant"], rel=1e-3)
    assert ours["ppl_base"] == pytest.approx(tool["ppl_base"], rel=1e-3)
    assert ours["mean_kld"] == pytest.approx(tool["mean_kld"], rel=1e-2, abs=1e-6)
    assert ours["kld_99_9"] == pytest.approx(tool["kld_99_9"], rel=1e-2, abs=1e-6)
    assert abs(ours["same_top_p"] - tool["same_top_p"]) * 100 <= 0.05


def run_llama_perplexity(tool: Path, base: Path, quant: Path, workdir: Path, *, ctx: int, chunks: int,
                         batch: int, ubatch: int, flash_attn: str, threads: int) -> tuple[dict, str]:
    """llama-perplexity's base pass then its KLD pass; (parsed summary, KLD pass output)."""
    common = common_args(ctx=ctx, batch=batch, ubatch=ubatch, flash_attn=flash_attn, threads=threads)
    workdir.mkdir(parents=True, exist_ok=True)
    kld = workdir / "base.kld"
    run_tool(tool, ["-m", str(base), "-f", str(default_corpus()), "--chunks", str(chunks), *common,
                    "--kl-divergence-base", str(kld)], must_contain="Final estimate")
    text = run_tool(tool, ["-m", str(quant), *common, "--kl-divergence-base", str(kld), "--kl-divergence"],
                    must_contain="Same top p:")
    return parse_kld_summary(text), text


def test_shipped_corpus_is_large_enough() -> None:
    # >= 100 chunks at the tiny family's context of 256 with a ~1k-token vocabulary
    assert count_chunks(BASE, default_corpus(), ctx=256) >= 100


def test_tool_runs_the_installed_kernels(llama_tools: dict[str, Path], tmp_path: Path) -> None:
    """The tool loads the libraries llama-cpp-python loads, so both see the same CPU features."""
    from qatgguf import llamacpp

    tool = llama_tools["llama-perplexity"]
    ldd = subprocess.run(["ldd", str(tool)], capture_output=True, text=True, env=llamacpp.tool_env(),
                         check=True).stdout
    libs = {line.split()[0]: line.split()[2] for line in ldd.splitlines() if "=>" in line and "/" in line}
    for name in ("libllama.so.0", "libggml-cpu.so.0", "libggml-base.so.0"):
        assert Path(libs[name]).resolve().parent == llamacpp.lib_dir().resolve(), (name, libs.get(name))
    _, text = run_llama_perplexity(tool, BASE, MODELS / "tiny-q8_0.gguf", tmp_path, ctx=128, chunks=2,
                                   batch=512, ubatch=512, flash_attn="off", threads=2)
    assert llamacpp._cpu_features(text) == llamacpp.system_info()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_llama_perplexity(case: str, llama_tools: dict[str, Path], tmp_path: Path) -> None:
    qfile, ctx, chunks, batch, ubatch, fa, threads = CASES[case]
    quant = MODELS / qfile
    tool, text = run_llama_perplexity(llama_tools["llama-perplexity"], BASE, quant, tmp_path, ctx=ctx,
                                      chunks=chunks, batch=batch, ubatch=ubatch, flash_attn=fa,
                                      threads=threads)
    r = evaluate(BASE, quant, default_corpus(), ctx=ctx, chunks=chunks, workdir=tmp_path / "ours",
                 settings=RunnerSettings(n_batch=batch, n_ubatch=ubatch, flash_attn=fa, n_threads=threads))
    ours = r.to_dict()
    # how many tokens are scored is the tool's rule, whatever the CPU: ctx/2 - 1 per chunk
    assert ours["n_chunks"] == chunks
    assert ours["n_tokens"] == chunks * (ctx - 1 - ctx // 2)
    assert_matches_tool(ours, tool)
    # the rest of the summary agrees too, at the precision the tool prints
    for k in ("kld_max", "kld_99", "kld_median", "kld_min"):
        assert ours[k] == pytest.approx(tool[k], rel=1e-2, abs=2e-6), k
    assert ours["dp_rms"] == pytest.approx(tool["dp_rms"], abs=1e-4)


@pytest.mark.parametrize("case", ["q4_0-c128-b512-fa_off", "q4_0-c128-b128-fa_on"])
def test_summary_is_the_tools_at_its_printed_precision(case: str, llama_tools: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """Same logits, and every per-token value computed as the tool computes it (expf
    values of the C library, double sums in its order): the printed summaries are equal,
    digit for digit, where the agreement bounds above allow a unit of the last digit."""
    qfile, ctx, chunks, batch, ubatch, fa, threads = CASES[case]
    tool, _ = run_llama_perplexity(llama_tools["llama-perplexity"], BASE, MODELS / qfile, tmp_path,
                                   ctx=ctx, chunks=chunks, batch=batch, ubatch=ubatch, flash_attn=fa,
                                   threads=threads)
    r = evaluate(BASE, MODELS / qfile, default_corpus(), ctx=ctx, chunks=chunks,
                 settings=RunnerSettings(n_batch=batch, n_ubatch=ubatch, flash_attn=fa, n_threads=threads))
    assert parse_kld_summary(r.format_table()) == tool


def test_llama_perplexity_is_deterministic_here(llama_tools: dict[str, Path], tmp_path: Path) -> None:
    """Two runs of the tool on this machine print the same summary, so a tolerance above
    its printed precision is never hiding run-to-run noise."""
    args = dict(ctx=128, chunks=8, batch=512, ubatch=512, flash_attn="off", threads=2)
    a, _ = run_llama_perplexity(llama_tools["llama-perplexity"], BASE, MODELS / "tiny-q4_0.gguf",
                                tmp_path / "a", **args)
    b, _ = run_llama_perplexity(llama_tools["llama-perplexity"], BASE, MODELS / "tiny-q4_0.gguf",
                                tmp_path / "b", **args)
    assert a == b


def test_same_quant_file_gives_zero_kld(tmp_path: Path) -> None:
    r = evaluate(
        BASE,
        BASE,
        default_corpus(),
        ctx=128,
        chunks=4,
        workdir=tmp_path,
        settings=RunnerSettings(n_batch=512, flash_attn="off", n_threads=2),
    )
    assert r.mean_kld < 1e-4 and r.same_top_p > 0.99
    assert r.ppl_ratio == pytest.approx(1.0, abs=1e-3)


def test_two_workers_give_the_numbers_of_one(tmp_path: Path) -> None:
    s = RunnerSettings(n_batch=256, flash_attn="off", n_threads=2)  # 2 chunks per batch
    corpus, quant = default_corpus(), MODELS / "tiny-q4_0.gguf"
    whole = evaluate(BASE, quant, corpus, ctx=128, chunks=10, workdir=tmp_path / "one", settings=s)
    ranges = plan_chunk_ranges(10, n_parts=2, n_seq=s.n_seq(128))
    assert len(ranges) == 2 and ranges[1][0] % 2 == 0
    recs = [
        compute_base_records(
            BASE, corpus, ctx=128, chunks=10, chunk_range=r, settings=s, workdir=tmp_path / "two"
        )
        for r in ranges
    ]
    parts = [evaluate_chunks(quant, rec, chunk_range=r) for rec, r in zip(recs, ranges)]
    assert merge(parts).to_dict() == whole.to_dict()
    # a range may also read several record files
    assert merge([evaluate_chunks(quant, recs)]).to_dict() == whole.to_dict()


def test_base_records_are_reused_not_recomputed(tmp_path: Path) -> None:
    s = RunnerSettings(n_batch=512, flash_attn="off", n_threads=2)
    p1 = compute_base_records(
        BASE, default_corpus(), ctx=128, chunks=4, settings=s, workdir=tmp_path
    )
    m1 = p1.stat().st_mtime_ns
    p2 = compute_base_records(
        BASE, default_corpus(), ctx=128, chunks=4, settings=s, workdir=tmp_path
    )
    assert p1 == p2 and p2.stat().st_mtime_ns == m1
    key = BaseRecords(p1).key
    assert (
        key["ctx"] == 128
        and key["settings"]["flash_attn"] == "off"
        and len(key["base_sha256"]) == 64
    )
    # another context is another key
    p3 = compute_base_records(
        BASE, default_corpus(), ctx=64, chunks=4, settings=s, workdir=tmp_path
    )
    assert p3 != p1
    # this weak model's rows are flat (every log-prob above -16), so they are stored dense:
    # never more than llama.cpp's file plus the per-row index (peaked rows: test_records_format)
    dense = export_llamacpp([p1], tmp_path / "base.kld")
    assert p1.stat().st_size <= dense.stat().st_size + 4 * 63 * 24 + 4096


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n", encoding="utf-8")
    with pytest.raises(
        EvaluationError, match=r"short\.txt: tokenizes to only \d+ tokens.*needs at least 256"
    ):
        evaluate(BASE, BASE, short, ctx=128)
    with pytest.raises(EvaluationError, match="multiple"):
        RunnerSettings(n_batch=300).n_seq(128)
    with pytest.raises(EvaluationError, match="not found"):
        evaluate(tmp_path / "missing.gguf", BASE, default_corpus(), ctx=128)


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qatgguf.cli import main

    rc = main(
        [
            "eval",
            "--base",
            str(BASE),
            "--quant",
            str(MODELS / "tiny-q8_0.gguf"),
            "--ctx",
            "128",
            "--chunks",
            "3",
            "--batch",
            "384",
            "--flash-attn",
            "off",
            "--threads",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_chunks"] == 3 and d["n_tokens"] == 3 * 63 and 0 < d["mean_kld"] < 0.1
    rc = main(
        [
            "eval",
            "--base",
            str(BASE),
            "--quant",
            str(MODELS / "tiny-q8_0.gguf"),
            "--ctx",
            "128",
            "--chunks",
            "3",
        ]
    )
    assert rc == 0 and "Same top p:" in capsys.readouterr().out


def test_llama_perplexity_reads_our_records_and_we_read_its(llama_tools: dict[str, Path], tmp_path: Path) -> None:
    tool = llama_tools["llama-perplexity"]
    s = RunnerSettings(n_batch=512, flash_attn="off", n_threads=2)
    quant, corpus = MODELS / "tiny-q4_0.gguf", default_corpus()
    ours_rec = compute_base_records(BASE, corpus, ctx=128, chunks=12, settings=s, workdir=tmp_path)
    ours = merge([evaluate_chunks(quant, ours_rec)]).to_dict()
    common = common_args(ctx=128, batch=512, ubatch=512, flash_attn="off", threads=2)
    exported = export_llamacpp([ours_rec], tmp_path / "ours.kld")
    text = run_tool(
        tool,
        ["-m", str(quant), *common, "--kl-divergence-base", str(exported), "--kl-divergence"],
        must_contain="Same top p:",
    )
    assert_matches_tool(ours, parse_kld_summary(text))
    theirs = tmp_path / "theirs.kld"
    run_tool(
        tool,
        [
            "-m",
            str(BASE),
            "-f",
            str(corpus),
            "--chunks",
            "12",
            *common,
            "--kl-divergence-base",
            str(theirs),
        ],
        must_contain="Final estimate",
    )
    assert (
        theirs.read_bytes()[20 : 20 + 4 * 128 * 12] == exported.read_bytes()[20 : 20 + 4 * 128 * 12]
    )  # same tokens
    from_theirs = merge([evaluate_chunks(quant, theirs, settings=s)]).to_dict()
    assert_matches_tool(from_theirs, parse_kld_summary(text))
