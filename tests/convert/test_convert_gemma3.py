"""Gemma 3 text: +1 on RMSNorm weights, sentencepiece vocabulary, logits vs transformers and
the same file as llama.cpp's converter."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tiny_gemma as tiny

from qatgguf.convert import convert, plan_conversion

pytest.importorskip("sentencepiece", reason="Gemma 3 tokenizer.model needs sentencepiece")


@pytest.fixture(scope="module")
def gemma3_ckpt(tmp_path_factory):
    tok = tiny.build_sp_tokenizer(tmp_path_factory.mktemp("sptok"))
    return tiny.build_gemma3(tmp_path_factory.mktemp("g3") / "ckpt", tok)


def test_gemma3_plan_shifts_norms(gemma3_ckpt):
    plan = plan_conversion(gemma3_ckpt, recipe="bf16")
    assert plan.arch == "gemma3"
    jobs = plan.tensors
    assert jobs["blk.0.attn_norm.weight"].transform == "norm_shift"
    assert jobs["blk.0.attn_q_norm.weight"].transform == "norm_shift"
    assert jobs["blk.0.attn_q.weight"].transform == "copy"
    assert "rope_freqs.weight" not in jobs
    kv = {k.key: k.value for k in plan.kvs}
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 1024


def test_gemma3_f32_logits_match_transformers(gemma3_ckpt, tmp_path):
    from transformers import AutoTokenizer

    out = convert(gemma3_ckpt, tmp_path / "g3.gguf", recipe="f32")[0]
    ids = [2] + AutoTokenizer.from_pretrained(gemma3_ckpt)(tiny.eval_text(), add_special_tokens=False)["input_ids"]
    ids = ids[:520]
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=1024, n_batch=1024, logits_all=True, n_gpu_layers=0,
                          n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    ref = tiny.reference_logits(gemma3_ckpt, ids)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    p = ref - ref.max(-1, keepdims=True)
    p = p - np.log(np.exp(p).sum(-1, keepdims=True))
    q = got - got.max(-1, keepdims=True)
    q = q - np.log(np.exp(q).sum(-1, keepdims=True))
    kld = float((np.exp(p) * (p - q)).sum(-1).mean())
    print(f"gemma3: {len(ids)} tokens, top-1 {top1:.4f}, mean KLD {kld:.2e}")
    assert top1 >= 0.995 and kld <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["bf16", "f32"])
def test_gemma3_same_file_as_llama_cpp_converter(vendored_llama_cpp, gemma3_ckpt, tmp_path, outtype):
    ref = tmp_path / "ref.gguf"
    res = subprocess.run([sys.executable, str(vendored_llama_cpp / "convert_hf_to_gguf.py"), str(gemma3_ckpt),
                          "--outtype", outtype, "--outfile", str(ref)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = convert(gemma3_ckpt, tmp_path / "ours.gguf", recipe=outtype)[0]
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(ref)
    fa = {k: f.contents() for k, f in a.fields.items()}
    fb = {k: f.contents() for k, f in b.fields.items()}
    assert sorted(fa) == sorted(fb)
    assert {k: v for k, v in fa.items() if fb[k] != v} == {}
    ta = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in a.tensors}
    tb = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    assert [n for n in ta if ta[n] != tb[n]] == []
    assert ours.read_bytes() == ref.read_bytes()
