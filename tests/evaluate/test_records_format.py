"""Base-record file format, llama.cpp export, range planning, merge and gate (no model)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from qatgguf.errors import EvaluationError
from qatgguf.evaluate import metrics as M
from qatgguf.config import GateConfig
from qatgguf.evaluate.gate import apply_gate
from qatgguf.evaluate.chunks import plan_chunk_ranges
from qatgguf.evaluate.export import export_llamacpp
from qatgguf.evaluate.ranges import RangeValues
from qatgguf.evaluate.records import BaseRecords, RecordWriter
from qatgguf.evaluate.result import merge

CTX, V = 32, 3000


def _write(
    tmp: Path, rng: np.random.Generator, start: int, n: int, spread: float
) -> tuple[Path, list, np.ndarray]:
    w = RecordWriter(V)
    logits, toks = [], []
    for _ in range(n):
        t = rng.integers(0, V, CTX).astype(np.int32)
        x = (rng.standard_normal((CTX - 1 - CTX // 2, V)) * spread).astype(np.float32)
        x[:, 7] += 20.0  # a confident top token: most entries fall below -16.5 and are dropped
        w.tokens.append(t)
        w.add_rows(M.quantize_log_probs(x), t[CTX // 2 + 1 :].astype(np.int64))
        logits.append(x)
        toks.append(t)
    p = tmp / f"r{start}.qgkl"
    w.write(
        p,
        {
            "key": {"k": start},
            "ctx": CTX,
            "n_vocab": V,
            "chunk_start": start,
            "chunk_end": start + n,
        },
    )
    return p, logits, np.stack(toks)


@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_compact_record_gives_the_metrics_of_the_dense_record(
    tmp_path: Path, spread: float
) -> None:
    rng = np.random.default_rng(0)
    path, logits, toks = _write(tmp_path, rng, 0, 3, spread)
    rec = BaseRecords(path)
    assert (rec.ctx, rec.n_vocab, rec.chunk_start, rec.chunk_end) == (CTX, V, 0, 3)
    for i in range(3):
        dense = M.quantize_log_probs(logits[i])
        back = rec.chunk_rows(i)
        tgt = toks[i][CTX // 2 + 1 :].astype(np.int64)
        quant = logits[i] + (rng.standard_normal(logits[i].shape) * 0.2).astype(np.float32)
        a, b = M.token_values(quant, tgt, dense), M.token_values(quant, tgt, back)
        for f in ("nll", "nll_base", "kld", "p_diff", "same_top"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
        assert np.array_equal(rec.chunk_tokens(i), toks[i])
    dense_bytes = 3 * (CTX - 1 - CTX // 2) * (2 * V + 8)
    if spread == 0.5:  # peaked rows keep few entries
        assert path.stat().st_size < dense_bytes / 4


def test_export_llamacpp_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p1, _l1, t1 = _write(tmp_path, rng, 0, 2, 1.0)
    p2, l2, t2 = _write(tmp_path, rng, 2, 1, 1.0)
    out = export_llamacpp([p2, p1], tmp_path / "base.kld")
    nv = 2 * ((V + 1) // 2) + 4
    assert (
        out.stat().st_size == 20 + 4 * CTX * 3 + 2 * 3 * (CTX - 1 - CTX // 2) * nv
    )  # ref: tools/perplexity/perplexity.cpp perplexity(): the --kl-divergence-base file it writes
    rec = BaseRecords(out)
    assert rec.llamacpp and (rec.chunk_start, rec.chunk_end) == (0, 3)
    ours = BaseRecords(p2)
    tgt = t2[0][CTX // 2 + 1 :].astype(np.int64)
    a = M.token_values(l2[0], tgt, ours.chunk_rows(2))
    b = M.token_values(l2[0], tgt, rec.chunk_rows(2))
    assert np.array_equal(a.kld, b.kld) and np.array_equal(a.nll_base, b.nll_base)
    assert np.array_equal(rec.chunk_tokens(1), t1[1])


def test_bad_record_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"NOTAREC!" + b"\0" * 64)
    with pytest.raises(EvaluationError, match="x.bin.*not a base record"):
        BaseRecords(bad)
    rng = np.random.default_rng(2)
    p, *_ = _write(tmp_path, rng, 0, 2, 1.0)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(EvaluationError, match="truncated"):
        BaseRecords(p)


def test_plan_chunk_ranges() -> None:
    r = plan_chunk_ranges(100, n_parts=2, n_seq=8)
    assert r[0][0] == 0 and r[-1][1] == 100
    assert all(a % 8 == 0 for a, _ in r)
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(r))
    assert plan_chunk_ranges(3, n_parts=5, n_seq=1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(EvaluationError):
        plan_chunk_ranges(0, n_parts=1)


def _stats(a: int, b: int, rng: np.random.Generator, quant: str = "q") -> RangeValues:
    n = (b - a) * 15
    v = M.TokenValues(
        nll=rng.random(n, dtype=np.float32) * 3,
        nll_base=rng.random(n, dtype=np.float32) * 3,
        kld=rng.random(n) * 0.01,
        p_diff=(rng.random(n, dtype=np.float32) - 0.5) * 0.1,
        same_top=rng.random(n) < 0.9,
    )
    return RangeValues(
        chunk_start=a,
        chunk_end=b,
        ctx=32,
        n_vocab=V,
        base_sha256="b",
        corpus_sha256="c",
        quant_sha256=quant,
        base_size=10,
        quant_size=5,
        values=v,
    )


def test_merge_is_exact_and_checks_ranges(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s1, s2 = _stats(0, 4, rng), _stats(4, 10, rng)
    whole = RangeValues(
        0, 10, 32, V, "b", "c", "q", 10, 5, M.TokenValues.concat([s1.values, s2.values])
    )
    assert merge([s2, s1]) == merge([whole])
    r = merge([s1, s2])
    assert r.n_chunks == 10 and r.n_tokens == 150
    assert set(r.to_dict()) >= {
        "mean_kld",
        "mean_kld_err",
        "kld_99_9",
        "same_top_p",
        "ppl_ratio",
        "n_tokens",
        "base_sha256",
        "quant_sha256",
        "corpus_sha256",
        "base_size",
        "quant_size",
    }
    assert merge([RangeValues.load(s1.save(tmp_path / "a.npz")), s2]) == r
    with pytest.raises(EvaluationError, match="gap or overlap"):
        merge([s1, _stats(5, 10, rng)])
    with pytest.raises(EvaluationError, match="different evaluations"):
        merge([s1, _stats(4, 10, rng, quant="other")])


def test_gate() -> None:
    rng = np.random.default_rng(4)
    r = merge([_stats(0, 10, rng)])
    ok = apply_gate(
        r, GateConfig(max_mean_kld=1.0, max_kld_99_9=1.0, min_same_top_p=0.5, max_ppl_ratio=10)
    )
    assert ok.passed and not ok.reasons and len(ok.checks) == 4
    bad = apply_gate(r, GateConfig(max_mean_kld=1e-9, max_kld_99_9=None, min_same_top_p=0.99, max_ppl_ratio=None))
    assert not bad.passed
    assert any("mean_kld" in x for x in bad.reasons) and any("same_top_p" in x for x in bad.reasons)
    assert "not published" in bad.summary()
    assert bad.to_dict()["passed"] is False
    with pytest.raises(ValueError, match="fraction"):
        GateConfig(min_same_top_p=95)
    with pytest.raises(ValueError, match="max_mean_kld"):
        GateConfig(max_mean_kld=float("nan"))


def test_an_aligned_file_must_beat_the_naive_one() -> None:
    from qatgguf.evaluate.gate import beats_baseline
    from qatgguf.evaluate.result import EvalResult

    def result(mean_kld: float) -> EvalResult:
        return EvalResult(**{**{f: 0.5 for f in EvalResult.__dataclass_fields__}, "mean_kld": mean_kld})

    ok = apply_gate(result(0.001), GateConfig(max_mean_kld=0.1, max_kld_99_9=None, min_same_top_p=None, max_ppl_ratio=None))
    assert beats_baseline(ok, result(0.001), 100, result(0.01), 120).passed
    worse = beats_baseline(ok, result(0.02), 100, result(0.01), 120)
    assert not worse.passed and any("mean_kld < naive" in r for r in worse.reasons)
    larger = beats_baseline(ok, result(0.001), 121, result(0.01), 120)
    assert not larger.passed and any("size <= naive: 121 is not <= the naive file's 120" in r for r in larger.reasons)
    failed = apply_gate(result(0.5), GateConfig(max_mean_kld=0.1, max_kld_99_9=None, min_same_top_p=None, max_ppl_ratio=None))
    assert not beats_baseline(failed, result(0.5), 100, result(0.9), 120).passed  # the thresholds still hold
