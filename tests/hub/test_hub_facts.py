"""Facts the card states, read from a real converted GGUF and checked against llama.cpp
on this machine (its KV cache size log) and against the checkpoint's configs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qatgguf.errors import ModelCardError
from qatgguf.hub.facts import read_model_facts
from qatgguf.hub.plot import plot_kld_distribution


@pytest.fixture(scope="module")
def e2b_gguf(tmp_path_factory, tiny_family) -> Path:
    from qatgguf.convert import convert

    out = tmp_path_factory.mktemp("facts") / "e2b-Q4_0.gguf"
    return convert(tiny_family["E2B"], out, recipe="q4_0")[0]


def _llama_kv_log(gguf: Path, ctx: int) -> list[tuple[float, int, int]]:
    """(MiB, cells, layers) of each KV cache llama.cpp creates with llama-cli's defaults
    (no full-size SWA cache, flash attention on so V is not padded)."""
    code = (
        "import sys; from llama_cpp import Llama; "
        f"Llama({str(gguf)!r}, n_ctx={ctx}, n_gpu_layers=0, swa_full=False, flash_attn=True, verbose=True)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    pat = r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers"
    return [(float(a), int(b), int(c)) for a, b, c in re.findall(pat, p.stderr)]


@pytest.mark.parametrize("ctx", [300, 4096, 20000])
def test_kv_cache_matches_llama_cpp(e2b_gguf: Path, ctx: int) -> None:
    facts = read_model_facts(e2b_gguf)
    logged = _llama_kv_log(e2b_gguf, ctx)
    assert len(logged) == 2  # the global and the sliding-window cache
    ours = facts.kv_cache_bytes(ctx) / 2**20
    assert abs(sum(m for m, _, _ in logged) - ours) < 0.011  # llama.cpp prints 2 decimals
    cells = {facts.kv_cells(ctx, swa=False), facts.kv_cells(ctx, swa=True)}
    assert {c for _, c, _ in logged} == cells
    assert sum(n for _, _, n in logged) == facts.kv_layers


def test_context_sampling_and_thinking_come_from_the_checkpoint(e2b_gguf: Path, tiny_family) -> None:
    facts = read_model_facts(e2b_gguf)
    gen = json.loads((tiny_family["E2B"] / "generation_config.json").read_text())
    cfg = json.loads((tiny_family["E2B"] / "config.json").read_text())["text_config"]
    assert facts.context_length == cfg["max_position_embeddings"]
    assert (facts.temperature, facts.top_p, facts.top_k) == (gen["temperature"], gen["top_p"], gen["top_k"])
    assert facts.shared_kv_layers == cfg["num_kv_shared_layers"]
    assert facts.thinking_switch is False  # the tiny template has no switch
    gemma = "{%- if enable_thinking is defined and enable_thinking -%}<|think|>{%- endif -%}"
    assert dataclasses.replace(facts, chat_template=gemma).thinking_switch is True
    assert "the last 5 of the 10 layers reuse" in facts.kv_formula()


def test_a_broken_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ModelCardError, match=r"x\.gguf: cannot read GGUF metadata"):
        read_model_facts(bad)


def test_kld_plot_is_a_png_and_repeatable(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    aligned, naive = rng.gamma(0.5, 0.002, 5000), rng.gamma(0.5, 0.05, 5000)
    a = plot_kld_distribution(aligned, naive, tmp_path / "a.png", aligned_label="UD-Q4_K_XL",
                              naive_label="Q4_0", title="E2B").read_bytes()
    b = plot_kld_distribution(aligned, naive, tmp_path / "b.png", aligned_label="UD-Q4_K_XL",
                              naive_label="Q4_0", title="E2B").read_bytes()
    assert a.startswith(b"\x89PNG\r\n\x1a\n") and a == b
    with pytest.raises(ModelCardError, match="holds NaN or Inf"):
        plot_kld_distribution(np.array([np.nan]), naive, tmp_path / "c.png",
                              aligned_label="a", naive_label="n", title="t")
    with pytest.raises(ModelCardError, match="no per-token values"):
        plot_kld_distribution(np.array([]), naive, tmp_path / "c.png",
                              aligned_label="a", naive_label="n", title="t")
