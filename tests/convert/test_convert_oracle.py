"""Against llama.cpp's own converter (the vendored convert_hf_to_gguf.py + gguf-py):
same metadata keys, types and values, same tensor names, shapes and types, the same BF16
bytes, and identical llama.cpp logits.

Deliberate differences, each checked below:
- a transformers-5.24 config whose global head size equals `head_dim` (dropped from
  `per_layer_config`) makes llama.cpp's converter fail; ours converts it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tiny_gemma as tiny

from qatgguf.convert import convert

pytestmark = pytest.mark.slow


def _oracle(vendored, ckpt, out, outtype):
    return subprocess.run([sys.executable, str(vendored / "convert_hf_to_gguf.py"), str(ckpt), "--outtype",
                           outtype, "--outfile", str(out)], capture_output=True, text=True)


def _read(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: ([int(t) for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
               for t in r.tensors}
    return fields, tensors


@pytest.mark.parametrize("variant", ["dense", "moe", "ple"])
@pytest.mark.parametrize("outtype", ["bf16", "f32"])
def test_same_file_as_llama_cpp_converter(vendored_llama_cpp, make_ckpt, tmp_path, variant, outtype):
    ckpt = make_ckpt(variant)
    ref_path = tmp_path / "ref.gguf"
    res = _oracle(vendored_llama_cpp, ckpt, ref_path, outtype)
    assert res.returncode == 0, res.stderr[-3000:]
    ours_path = convert(ckpt, tmp_path / "ours.gguf", recipe=outtype)[0]
    ref_f, ref_t = _read(ref_path)
    our_f, our_t = _read(ours_path)
    assert sorted(our_f) == sorted(ref_f)
    for k in ref_f:
        assert our_f[k] == ref_f[k], k
    assert sorted(our_t) == sorted(ref_t)
    for name, (qt, shape, data) in ref_t.items():
        assert our_t[name][:2] == (qt, shape), name
        assert our_t[name][2] == data, f"{name}: bytes differ"
    # beyond the requirement: same KV order, same tensor order, so the very same file
    assert ours_path.read_bytes() == ref_path.read_bytes()
    if outtype == "bf16":
        import llama_cpp

        ids = tiny_ids(ckpt)
        logits = []
        for p in (ref_path, ours_path):
            llm = llama_cpp.Llama(model_path=str(p), n_ctx=512, n_batch=512, logits_all=True, n_gpu_layers=0,
                                  n_threads=2, flash_attn=False, verbose=False)
            llm.eval(ids)
            logits.append(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
            del llm
        assert np.array_equal(logits[0], logits[1])


def test_split_files_equal_llama_cpp_converter(vendored_llama_cpp, make_ckpt, tmp_path):
    ckpt = make_ckpt("dense")
    ref_dir, our_dir = tmp_path / "ref", tmp_path / "ours"
    ref_dir.mkdir()
    res = subprocess.run([sys.executable, str(vendored_llama_cpp / "convert_hf_to_gguf.py"), str(ckpt),
                          "--outtype", "bf16", "--outfile", str(ref_dir / "m.gguf"), "--split-max-size", "300K"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = convert(ckpt, our_dir / "m.gguf", recipe="bf16", split_max_size=300_000)
    refs = sorted(ref_dir.glob("*.gguf"))
    assert [p.name for p in ours] == [p.name for p in refs] and len(refs) > 2
    for a, b in zip(ours, refs):
        assert a.read_bytes() == b.read_bytes(), a.name


def tiny_ids(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)(tiny.eval_text())["input_ids"][:300]


def test_global_head_dim_equal_to_head_dim(vendored_llama_cpp, make_ckpt, tmp_path):
    """Deliberate difference: llama.cpp's converter cannot read this config; ours can."""
    ckpt = make_ckpt("same_hd")
    res = _oracle(vendored_llama_cpp, ckpt, tmp_path / "ref.gguf", "bf16")
    assert res.returncode != 0
    out = convert(ckpt, tmp_path / "ours.gguf", recipe="bf16")[0]
    fields, _ = _read(out)
    assert fields["gemma4.attention.key_length"][1] == 32
    assert fields["gemma4.attention.key_length_swa"][1] == 32
