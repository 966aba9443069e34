"""The project's tiny Gemma 4 family (E2B, E4B, 12B, 26B-A4B, 31B): every size converts,
runs in llama.cpp with transformers' logits, and equals llama.cpp's own converter."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qatgguf.convert import convert, plan_conversion

FAMILY = ["E2B", "E4B", "12B", "26B-A4B", "31B", "E2B-mobile", "E4B-mobile"]


def _reference(ckpt, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_family_f32_logits(tiny_family, tmp_path, name):
    import llama_cpp
    from transformers import AutoTokenizer

    ckpt = tiny_family[name]
    plan = plan_conversion(ckpt, recipe="f32")
    assert all(not t.gguf_name.startswith(("v.", "a.", "mm.")) for t in plan.tensors.values())
    assert all(".language_model." not in m.hf_name for m in plan.mmproj)
    out = convert(ckpt, tmp_path / f"{name}.gguf", recipe="f32")[0]
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()[:12000]
    ids = AutoTokenizer.from_pretrained(ckpt)(text)["input_ids"][:520]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=1024, n_batch=1024, logits_all=True, n_gpu_layers=0,
                          n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True, special=False)[:520] == ids
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    ref = _reference(ckpt, ids)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    lp = ref - ref.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kld = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    print(f"{name}: {len(ids)} tokens, top-1 {top1:.4f}, mean KLD {kld:.2e}, mmproj tensors {len(plan.mmproj)}")
    assert len(ids) >= 500 and top1 >= 0.995 and kld <= 1e-5

@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_family_same_file_as_llama_cpp_converter(vendored_llama_cpp, tiny_family, tmp_path, name):
    ckpt = tiny_family[name]
    ref = tmp_path / "ref.gguf"
    res = subprocess.run([sys.executable, str(vendored_llama_cpp / "convert_hf_to_gguf.py"), str(ckpt),
                          "--outtype", "bf16", "--outfile", str(ref)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = convert(ckpt, tmp_path / "ours.gguf", recipe="bf16")[0]
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(ref)
    fa = {k: f.contents() for k, f in a.fields.items()}
    fb = {k: f.contents() for k, f in b.fields.items()}
    assert sorted(fa) == sorted(fb)
    assert {k: (v, fb[k]) for k, v in fa.items() if fb[k] != v} == {}
    ta = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in a.tensors}
    tb = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    assert [n for n in ta if ta[n] != tb[n]] == []
