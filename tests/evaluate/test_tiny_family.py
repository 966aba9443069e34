"""Evaluation of the project's own tiny Gemma 4 family, converted by the project's converter."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatgguf.evaluate import RunnerSettings, count_chunks, default_corpus, evaluate

pytest.importorskip("llama_cpp")

# 12B has no KV-shared layers; E2B/E4B GGUFs currently hit a GGML_ASSERT in llama.cpp's
# kv-cache (llama-kv-cache.cpp:268) in llama-perplexity as well as here.
MODEL = "12B"


@pytest.fixture(scope="module")
def ggufs(
    tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from qatgguf.convert import convert

    out = tmp_path_factory.mktemp("family-gguf")
    return {
        r: convert(tiny_family[MODEL], out / f"{MODEL}-{r}.gguf", recipe=r)[0]
        for r in ("bf16", "q4_0")
    }


@pytest.mark.slow
def test_tiny_family_quant_against_llama_perplexity(ggufs: dict[str, Path], tmp_path: Path) -> None:
    from qatgguf.evaluate.reference import (
        common_args,
        find_llama_perplexity,
        parse_kld_summary,
        run_tool,
    )

    corpus = default_corpus()
    assert count_chunks(ggufs["bf16"], corpus, ctx=256) >= 100  # the corpus is large enough
    s = RunnerSettings(n_batch=1024, flash_attn="auto", n_threads=2)
    r = evaluate(
        ggufs["bf16"], ggufs["q4_0"], corpus, ctx=256, chunks=8, workdir=tmp_path, settings=s
    )
    assert r.n_tokens == 8 * 127 and 0 <= r.mean_kld < 0.05 and r.same_top_p > 0.9
    same = evaluate(
        ggufs["bf16"], ggufs["bf16"], corpus, ctx=256, chunks=4, workdir=tmp_path, settings=s
    )
    assert abs(same.mean_kld) < 1e-5 and same.same_top_p == 1.0
    tool = find_llama_perplexity()
    if tool is None:
        return  # the comparison with the tool itself runs in test_eval_llama.py's slow tests
    common = common_args(ctx=256, batch=1024, ubatch=512, flash_attn="auto", threads=2)
    kld = tmp_path / "base.kld"
    run_tool(
        tool,
        [
            "-m",
            str(ggufs["bf16"]),
            "-f",
            str(corpus),
            "--chunks",
            "8",
            *common,
            "--kl-divergence-base",
            str(kld),
        ],
        must_contain="Final estimate",
    )
    t = parse_kld_summary(
        run_tool(
            tool,
            [
                "-m",
                str(ggufs["q4_0"]),
                *common,
                "--kl-divergence-base",
                str(kld),
                "--kl-divergence",
            ],
            must_contain="Same top p:",
        )
    )
    assert r.ppl_quant == pytest.approx(t["ppl_quant"], rel=1e-3)
    assert r.ppl_base == pytest.approx(t["ppl_base"], rel=1e-3)
    assert r.mean_kld == pytest.approx(t["mean_kld"], rel=1e-2, abs=2e-6)
    assert r.kld_99_9 == pytest.approx(t["kld_99_9"], rel=1e-2, abs=2e-6)
    assert abs(r.same_top_p - t["same_top_p"]) * 100 <= 0.05
