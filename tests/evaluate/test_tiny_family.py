"""Evaluation of the project's own tiny Gemma 4 family, converted by the project's
converter, against llama-perplexity run on this machine: every size, the KV-shared E2B
and E4B included (several sequences per batch, as the release evaluates them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatgguf.evaluate import RunnerSettings, count_chunks, default_corpus, evaluate
from qatgguf.evaluate.reference import common_args, parse_kld_summary, run_tool

pytest.importorskip("llama_cpp")

FAMILY = ["E2B", "E4B", "12B", "26B-A4B", "31B"]
CTX, CHUNKS, BATCH = 256, 8, 1024  # 4 chunks per batch: 4 sequences share the KV cache


@pytest.fixture(scope="module")
def ggufs(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from qatgguf.convert import convert

    out = tmp_path_factory.mktemp("family-gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(model: str, recipe: str) -> Path:
        if (model, recipe) not in made:
            made[model, recipe] = convert(tiny_family[model], out / f"{model}-{recipe}.gguf", recipe=recipe)[0]
        return made[model, recipe]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", FAMILY)
def test_tiny_family_quant_against_llama_perplexity(
    model: str, ggufs, llama_tools: dict[str, Path], tmp_path: Path
) -> None:
    base, quant = ggufs(model, "bf16"), ggufs(model, "q4_0")
    corpus = default_corpus()
    assert count_chunks(base, corpus, ctx=CTX) >= 100  # the corpus is large enough
    s = RunnerSettings(n_batch=BATCH, flash_attn="auto", n_threads=2)
    r = evaluate(base, quant, corpus, ctx=CTX, chunks=CHUNKS, workdir=tmp_path, settings=s)
    assert r.n_tokens == CHUNKS * (CTX // 2 - 1) and 0 <= r.mean_kld < 0.05 and r.same_top_p > 0.9

    tool = llama_tools["llama-perplexity"]
    common = common_args(ctx=CTX, batch=BATCH, ubatch=512, flash_attn="auto", threads=2)
    kld = tmp_path / "base.kld"
    run_tool(tool, ["-m", str(base), "-f", str(corpus), "--chunks", str(CHUNKS), *common,
                    "--kl-divergence-base", str(kld)], must_contain="Final estimate")
    t = parse_kld_summary(run_tool(
        tool, ["-m", str(quant), *common, "--kl-divergence-base", str(kld), "--kl-divergence"],
        must_contain="Same top p:"))
    assert r.ppl_quant == pytest.approx(t["ppl_quant"], rel=1e-3)
    assert r.ppl_base == pytest.approx(t["ppl_base"], rel=1e-3)
    assert r.mean_kld == pytest.approx(t["mean_kld"], rel=1e-2, abs=2e-6)
    assert r.kld_99_9 == pytest.approx(t["kld_99_9"], rel=1e-2, abs=2e-6)
    assert abs(r.same_top_p - t["same_top_p"]) * 100 <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize("model", ["E2B", "12B"])
def test_same_file_gives_zero_kld(model: str, ggufs, tmp_path: Path) -> None:
    base = ggufs(model, "bf16")
    s = RunnerSettings(n_batch=BATCH, flash_attn="auto", n_threads=2)
    same = evaluate(base, base, default_corpus(), ctx=CTX, chunks=4, workdir=tmp_path, settings=s)
    assert abs(same.mean_kld) < 1e-5 and same.same_top_p == 1.0
