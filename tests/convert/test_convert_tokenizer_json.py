"""Checkpoints whose tokenizer transformers 5 saved: tokenizer.json and no tokenizer.model.

llama.cpp's converter then reads the BPE vocabulary of tokenizer.json (conversion/gemma.py
Gemma3Model.set_vocab -> base.py _set_vocab_gpt2; Gemma4Model.set_vocab -> LlamaHfVocab).
Our files must equal its files byte for byte.

Deliberate difference, checked below: llama.cpp's converter names the BPE pre-tokenizer by
the sha256 of the ids of a fixed text and refuses a tokenizer it has no hash for; ours
falls back to "gemma4", llama.cpp's pre-tokenizer for SentencePiece-style BPE, when the
pipeline is Gemma's (spaces to "▁", BPE over the whole text). The oracle runs with the
tiny tokenizer's hash registered under that name, as convert_hf_to_gguf_update.py
registers a model, and llama.cpp must then tokenize like transformers.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_gemma as tiny

from qatgguf.convert import convert, plan_conversion
from qatgguf.errors import CheckpointError

pytest.importorskip("sentencepiece", reason="the Gemma 3 test tokenizer is trained with sentencepiece")

# Runs llama.cpp's converter with one more entry in its pre-tokenizer table (hash -> name).
_ORACLE = '''
import ast, hashlib, re, runpy, sys
vendored, chkhsh, name, *args = sys.argv[1:]
sys.path.insert(0, vendored)
sys.path.insert(1, vendored + "/gguf-py")  # as convert_hf_to_gguf.py itself does
import conversion.base as base
src = open(vendored + "/conversion/base.py", encoding="utf-8").read()
chktxt = ast.literal_eval(re.search(r"^\\s*chktxt = (.+)$", src, re.M).group(1))
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    if hashlib.sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest() == chkhsh:
        return name
    return known(self, tokenizer)
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [vendored + "/convert_hf_to_gguf.py", *args]
runpy.run_path(vendored + "/convert_hf_to_gguf.py", run_name="__main__")
'''


def _chkhsh(ckpt: Path) -> str:
    from hashlib import sha256

    from transformers import AutoTokenizer

    from qatgguf.convert.metadata import _CHKTXT

    return sha256(str(AutoTokenizer.from_pretrained(ckpt).encode(_CHKTXT)).encode()).hexdigest()


def _oracle(vendored: Path, ckpt: Path, out: Path, tmp: Path, *, register: str | None = "gemma4"):
    script = tmp / "oracle.py"
    script.write_text(_ORACLE, encoding="utf-8")
    chk = _chkhsh(ckpt) if register else "-"
    return subprocess.run([sys.executable, str(script), str(vendored), chk, register or "-", str(ckpt),
                           "--outtype", "bf16", "--outfile", str(out)], capture_output=True, text=True,
                          check=False)


def _fields(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    return ({k: ([int(t) for t in f.types], f.contents()) for k, f in r.fields.items()
             if not k.startswith("GGUF.")},
            {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors})


@pytest.fixture(scope="module")
def gemma3_t5(tmp_path_factory) -> Path:
    """A Gemma 3 checkpoint whose tokenizer transformers 5 saved; the model's vocab (1031)
    is larger than the tokenizer's ids (1025), as in the real Gemma 3. llama.cpp trims the
    embedding to len(vocab) + len(added_tokens) of tokenizer.json (1024 + 7) and lists
    vocab_size tokens: the two agree here, so llama.cpp loads the file."""
    root = tmp_path_factory.mktemp("g3t5")
    sp = tiny.build_sp_tokenizer(root / "sp")
    tok = tiny.save_like_transformers5(sp, root / "tok")
    shutil.rmtree(sp)  # nothing may read the sentencepiece model any more
    return tiny.build_gemma3(root / "ckpt", tok, vocab_size=1031)


def test_gemma3_plan_reads_the_bpe_vocabulary(gemma3_t5):
    assert not (gemma3_t5 / "tokenizer.model").exists()
    plan = plan_conversion(gemma3_t5, recipe="bf16")
    kv = {k.key: k.value for k in plan.kvs}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gemma4"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 1031 and tokens[1030] == "[PAD1030]" and tokens[2] == "<bos>"
    assert "tokenizer.ggml.scores" not in kv and kv["tokenizer.ggml.merges"]
    # embedding rows trimmed as llama.cpp trims them: len(vocab) + len(added_tokens) of
    # tokenizer.json (1024 + 7, the added tokens counted even where they are in the vocab)
    assert plan.tensors["token_embd.weight"].shape == (1031, 128)


@pytest.mark.slow
def test_gemma3_same_file_as_llama_cpp_converter(vendored_llama_cpp, gemma3_t5, tmp_path):
    ref = tmp_path / "ref.gguf"
    res = _oracle(vendored_llama_cpp, gemma3_t5, ref, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = convert(gemma3_t5, tmp_path / "ours.gguf", recipe="bf16")[0]
    ref_f, ref_t = _fields(ref)
    our_f, our_t = _fields(ours)
    assert sorted(our_f) == sorted(ref_f)
    assert {k: (our_f[k], ref_f[k]) for k in ref_f if our_f[k] != ref_f[k]} == {}
    assert sorted(our_t) == sorted(ref_t)
    assert [n for n in ref_t if our_t[n] != ref_t[n]] == []
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_gemma3_llama_cpp_tokenizes_and_predicts_like_transformers(gemma3_t5, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    out = convert(gemma3_t5, tmp_path / "g3.gguf", recipe="f32")[0]
    text = tiny.eval_text()
    ids = AutoTokenizer.from_pretrained(gemma3_t5)(text, add_special_tokens=False)["input_ids"][:500]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=1024, n_batch=1024, logits_all=True, n_gpu_layers=0,
                          n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False)[:500] == ids
    ids = [2, *ids]
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    ref = tiny.reference_logits(gemma3_t5, ids)
    assert float((got.argmax(-1) == ref.argmax(-1)).mean()) >= 0.995


def test_unknown_pre_tokenizer_is_refused_like_llama_cpp(vendored_llama_cpp, gemma3_t5, tmp_path):
    """A tokenizer that is neither in llama.cpp's table nor SentencePiece-style BPE: both
    converters refuse it; ours names tokenizer.json."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gemma3_t5, ckpt)
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = None
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                           "use_regex": True}
    (ckpt / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*pre-tokenizer not recognized"):
        plan_conversion(ckpt, recipe="bf16")
    res = _oracle(vendored_llama_cpp, ckpt, tmp_path / "ref.gguf", tmp_path, register=None)
    assert res.returncode != 0 and "BPE pre-tokenizer was not recognized" in res.stderr


def test_vocab_larger_than_the_model_is_refused(gemma3_t5, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(gemma3_t5, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    cfg["vocab_size"] = 1024  # the tokenizer has id 1024 (<mask>)
    (ckpt / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*token id 1024 is not below.*vocab_size 1024"):
        plan_conversion(ckpt, recipe="bf16")


def test_pre_tokenizer_table_is_llama_cpps(vendored_llama_cpp):
    """bpe_pre.json and the check text are those of the installed llama.cpp's converter."""
    from qatgguf.convert.metadata import _CHKTXT, _known_pre_hashes

    src = (vendored_llama_cpp / "conversion" / "base.py").read_text(encoding="utf-8")
    assert ast.literal_eval(re.search(r"^\s*chktxt = (.+)$", src, re.MULTILINE).group(1)) == _CHKTXT
    body = src[src.index("def get_vocab_base_pre"):]
    body = body[: body.index("if res is None:")]
    table: dict[str, str] = {}
    for h, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body):
        table[h] = name  # sequential ifs: the last assignment wins
    assert len(table) > 50 and _known_pre_hashes() == table


@pytest.mark.slow
def test_gemma4_saved_by_transformers5_same_file_as_llama_cpp_converter(
        vendored_llama_cpp, make_ckpt, tmp_path):
    src = make_ckpt("ple")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (ckpt / name).unlink(missing_ok=True)
    tiny.save_like_transformers5(src, ckpt)
    assert not (ckpt / "tokenizer.model").exists()
    ref = tmp_path / "ref.gguf"
    res = subprocess.run([sys.executable, str(vendored_llama_cpp / "convert_hf_to_gguf.py"), str(ckpt),
                          "--outtype", "bf16", "--outfile", str(ref)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = convert(ckpt, tmp_path / "ours.gguf", recipe="bf16")[0]
    assert ours.read_bytes() == ref.read_bytes()
