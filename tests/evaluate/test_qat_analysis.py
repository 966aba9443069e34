"""The QAT analysis on the tiny family: trained with learned-scale QAT, the aligned file
gives back the checkpoint, naive Q4_0 (exactly llama-quantize) does not, and the
difference shows in the KLD; the mobile mixtures' UD-Q2_K_XL against naive Q4_0.

Everything llama.cpp computes is compared with llama.cpp run on this machine: the naive
file is `llama_model_quantize` of the BF16 file, the independent KLD check is
`llama-perplexity --kl-divergence`. Evaluation settings are the tiny family's release
config (ctx 256, 32 chunks).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from qatgguf.convert import convert
from qatgguf.convert.exactness import gguf_exactness
from qatgguf.evaluate import EvalResult, RunnerSettings, default_corpus, evaluate
from qatgguf.evaluate.reference import common_args, parse_kld_summary, run_tool
from qatgguf.evaluate.tables import (
    COMPARISON_COLUMNS,
    MethodResult,
    MobileResult,
    comparison_rows,
    fixed,
    markdown,
    mobile_rows,
    tensor_types,
)

pytest.importorskip("llama_cpp")

SIZES = ["E2B", "E4B", "12B", "26B-A4B", "31B"]
MOBILE = ["E2B-mobile", "E4B-mobile"]
BATCH = 1024


def _eval_settings() -> tuple[int, int]:
    from qatgguf.config import builtin_config_path, load_release_config

    cfg = load_release_config(builtin_config_path("tiny-family"))
    return cfg.eval.ctx, int(cfg.eval.chunks or 32)


CTX, CHUNKS = _eval_settings()


def llama_quantize(src: Path, dst: Path, ftype: str = "Q4_0") -> Path:
    """`llama-quantize src dst Q4_0` in process (no imatrix): llama.cpp's own baseline."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) failed: {rc}")
    return dst


@dataclass
class ModelFiles:
    root: Path
    ckpt: Path
    files: dict[str, Path] = field(default_factory=dict)
    results: dict[str, EvalResult] = field(default_factory=dict)


@pytest.fixture(scope="module")
def family_files(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("qat-analysis")
    cache: dict[str, ModelFiles] = {}

    def get(model: str) -> ModelFiles:
        if model not in cache:
            cache[model] = ModelFiles(out / model, tiny_family[model])
        return cache[model]

    return get


def _file(m: ModelFiles, recipe: str) -> Path:
    if recipe not in m.files:
        if recipe == "llama-quantize":
            m.files[recipe] = llama_quantize(_file(m, "bf16"), m.root / "llama-quantize-Q4_0.gguf")
        else:
            m.files[recipe] = convert(m.ckpt, m.root / f"{recipe}.gguf", recipe=recipe)[0]
    return m.files[recipe]


def _result(m: ModelFiles, recipe: str) -> EvalResult:
    if recipe not in m.results:
        s = RunnerSettings(n_batch=BATCH, flash_attn="auto", n_threads=2)
        m.results[recipe] = evaluate(_file(m, "bf16"), _file(m, recipe), default_corpus(), ctx=CTX,
                                     chunks=CHUNKS, workdir=m.root / "eval", settings=s)
    return m.results[recipe]


def _gguf(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
               for t in r.tensors}
    return fields, tensors


@pytest.mark.parametrize("model", SIZES + MOBILE)
def test_q4_0_recipe_is_exactly_llama_quantize(model: str, family_files) -> None:
    """Same metadata values, same tensors with the same types and bytes (order may differ),
    the n_expert == 8 rule of the 26B-A4B included."""
    m = family_files(model)
    ours_f, ours_t = _gguf(_file(m, "q4_0"))
    ref_f, ref_t = _gguf(_file(m, "llama-quantize"))
    assert sorted(ours_f) == sorted(ref_f)
    assert {k: (ours_f[k], ref_f[k]) for k in ref_f if ours_f[k] != ref_f[k]} == {}
    assert sorted(ours_t) == sorted(ref_t)
    assert {n: (ours_t[n][0], ref_t[n][0]) for n in ref_t if ours_t[n][:2] != ref_t[n][:2]} == {}
    assert [n for n in ref_t if ours_t[n][2] != ref_t[n][2]] == []
    if model == "26B-A4B":  # 8 experts: llama-quantize bumps attn_k and attn_v to Q8_0
        kv = {n: t[0] for n, t in ref_t.items() if n.endswith(("attn_k.weight", "attn_v.weight"))}
        assert kv and set(kv.values()) == {"Q8_0"}


@pytest.mark.parametrize("model", SIZES)
def test_aligned_recovers_the_checkpoint_and_naive_does_not(model: str, family_files) -> None:
    m = family_files(model)
    aligned = gguf_exactness(_file(m, "UD-Q4_K_XL"), m.ckpt)
    naive = gguf_exactness(_file(m, "llama-quantize"), m.ckpt)
    print(f"{model}: aligned {aligned.exact}/{aligned.blocks} ({aligned.fraction:.4%}), "
          f"naive {naive.exact}/{naive.blocks} ({naive.fraction:.4%}) {naive.by_type()}")
    assert aligned.fraction >= 0.999
    assert naive.fraction <= 0.40
    assert aligned.blocks == naive.blocks  # the same tensors, block for block


@pytest.mark.slow
@pytest.mark.parametrize("model", SIZES)
def test_naive_kld_is_ten_times_the_aligned(model: str, family_files) -> None:
    m = family_files(model)
    ud, naive = _result(m, "UD-Q4_K_XL"), _result(m, "q4_0")
    print(markdown(comparison_rows(model, [
        MethodResult("UD-Q4_K_XL", _file(m, "UD-Q4_K_XL").stat().st_size, ud),
        MethodResult("Q4_0", _file(m, "q4_0").stat().st_size, naive)])))
    assert naive.mean_kld >= 10 * ud.mean_kld, (naive.mean_kld, ud.mean_kld)
    # the gate the release applies: below the naive file's KLD and no larger
    assert _file(m, "UD-Q4_K_XL").stat().st_size <= _file(m, "q4_0").stat().st_size
    assert ud.same_top_p > naive.same_top_p


@pytest.mark.slow
@pytest.mark.parametrize(("model", "tq2"), [("E2B-mobile", 16), ("E4B-mobile", 2)])
def test_mobile_ud_q2_k_xl(model: str, tq2: int, family_files, tiny_family) -> None:
    """TQ2_0 on the 2-bit layers (the E2B token embedding and deep MLPs, the E4B embeddings),
    Q8_0 on the per-layer-input gate and projection, Q4_0 elsewhere: the checkpoint given
    back, and a KLD against the mobile BF16 at least 10x below naive Q4_0's."""
    from qatgguf.fixtures import FAMILY

    m = family_files(model)
    path = _file(m, "UD-Q2_K_XL")
    types = tensor_types([path])
    assert types["TQ2_0"] == tq2 and types["Q8_0"] == 2 * FAMILY[model].num_layers
    assert gguf_exactness(path, m.ckpt).fraction >= 0.999
    # negative TQ2_0 scales where the grid is {-2,-1,0,1} times a positive step
    from gguf import GGUFReader

    scales = np.concatenate([
        np.asarray(t.data).reshape(-1, 66)[:, 64:66].copy().view(np.float16)[:, 0]
        for t in GGUFReader(path).tensors if t.tensor_type.name == "TQ2_0"])
    assert (scales < 0).any() and (scales > 0).any()
    ud, naive = _result(m, "UD-Q2_K_XL"), _result(m, "q4_0")
    row = MobileResult(path.stat().st_size, types["TQ2_0"], ud)
    print(markdown(mobile_rows({model.replace("-", " "): row})))
    assert naive.mean_kld >= 10 * ud.mean_kld, (naive.mean_kld, ud.mean_kld)
    assert path.stat().st_size < _file(m, "q4_0").stat().st_size
    assert ud.same_top_p > naive.same_top_p and 1.0 < ud.ppl_base < 2048


@pytest.mark.slow
@pytest.mark.parametrize(("model", "recipe"), [(s, "UD-Q4_K_XL") for s in SIZES]
                         + [(s, "UD-Q2_K_XL") for s in MOBILE])
def test_published_files_agree_with_llama_perplexity(model: str, recipe: str, family_files,
                                                     llama_tools, tmp_path) -> None:
    m = family_files(model)
    r = _result(m, recipe)
    tool = llama_tools["llama-perplexity"]
    common = common_args(ctx=CTX, batch=BATCH, ubatch=512, flash_attn="auto", threads=2)
    base = tmp_path / "base.kld"
    run_tool(tool, ["-m", str(_file(m, "bf16")), "-f", str(default_corpus()), "--chunks", str(CHUNKS),
                    *common, "--kl-divergence-base", str(base)], must_contain="Final estimate")
    t = parse_kld_summary(run_tool(
        tool, ["-m", str(_file(m, recipe)), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
        must_contain="Same top p:"))
    assert r.ppl_quant == pytest.approx(t["ppl_quant"], rel=1e-3)
    assert r.ppl_base == pytest.approx(t["ppl_base"], rel=1e-3)
    assert r.mean_kld == pytest.approx(t["mean_kld"], rel=1e-2, abs=2e-6)
    assert r.kld_99_9 == pytest.approx(t["kld_99_9"], rel=1e-2, abs=2e-6)
    assert abs(r.same_top_p - t["same_top_p"]) * 100 <= 0.05


def test_analysis_tables(family_files) -> None:
    m = family_files("31B")
    fake = EvalResult(**{f: 0.5 for f in EvalResult.__dataclass_fields__})  # type: ignore[arg-type]
    rows = comparison_rows("31B", [MethodResult("UD-Q4_K_XL", 2_440_000, fake),
                                   MethodResult("Q4_0", 17_650_000_000, fake)])
    assert [tuple(r) for r in rows] == [COMPARISON_COLUMNS] * 2
    assert rows[0]["Disk"] == "2.44 MB" and rows[1]["Disk"] == "17.65 GB" and rows[0]["Top-1 %"] == "50.00"
    assert fixed(0.05109, 5) == "0.05109" and fixed(2.64e-5, 5) == "0.0000264" and fixed(0.0, 4) == "0.0000"
    table = markdown(mobile_rows({"E2B mobile": MobileResult(3_740_000, 16, fake)}))
    assert table.splitlines()[0] == "|  | E2B mobile |"
    assert "| 2-bit (TQ2_0) tensors | 16 |" in table and "| Base PPL | 0.5 |" in table
    assert tensor_types([_file(m, "UD-Q4_K_XL")])["Q4_0"] > 0


def test_lattice_command_reports_grids_and_exactness(family_files, capsys) -> None:
    import json

    from qatgguf.cli import main

    m = family_files("E2B-mobile")
    ud, naive = _file(m, "UD-Q2_K_XL"), _file(m, "llama-quantize")
    assert main(["lattice", str(m.ckpt), "--gguf", str(ud), "--gguf", str(naive), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    grids = [r["grid"] for r in out["tensors"] if r["tensor"].startswith("model.language_model.")]
    assert grids.count("TQ2_0") == 16 and grids.count("Q8_0") == 20 and grids.count("Q4_0") > 40
    two_bit = next(r for r in out["tensors"] if r["tensor"].endswith("embed_tokens.weight"))
    assert "negative scale in" in two_bit["signature"]["recipe"]
    assert out["gguf"][0]["fraction"] == 1.0 and out["gguf"][1]["fraction"] < 0.5
    assert main(["lattice", str(m.ckpt), "--gguf", str(ud)]) == 0
    text = capsys.readouterr().out
    assert f"block exactness of {ud}: " in text and "(100.00%)" in text and "tensors on a grid:" in text
