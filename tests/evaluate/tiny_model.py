"""A tiny trained Llama converted with llama.cpp's own converter, for evaluation tests.

Built by `python tests/evaluate/tiny_model.py OUT_DIR` (about a minute): a
sentencepiece tokenizer (vocab 1024) and a 2-layer LlamaForCausalLM trained briefly on
the shipped corpus, so its distributions are far from uniform; converted to BF16 by the
vendored `convert_hf_to_gguf.py`; quantized to Q8_0 and Q4_0 by `llama_model_quantize`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from qatgguf.llamacpp import vendored_llama_cpp

VOCAB = 1024
SPEC = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "ffn": 128,
    "steps": 200,
    "seq": 128,
    "batch": 16,
    "seed": 0,
    "vocab": VOCAB,
    "version": 3,
}


def _train(hf_dir: Path, text: str) -> None:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(hf_dir / "tokenizer"),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
        max_sentence_length=100000,
    )
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    # encode line by line: sentencepiece is slow on one very long input
    ids = torch.tensor(
        [t for ln in text[: len(text) // 2].splitlines() for t in sp.encode(ln)], dtype=torch.long
    )
    torch.manual_seed(SPEC["seed"])
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=SPEC["hidden"],
        intermediate_size=SPEC["ffn"],
        num_hidden_layers=SPEC["layers"],
        num_attention_heads=SPEC["heads"],
        num_key_value_heads=SPEC["kv_heads"],
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, bs = SPEC["seq"], SPEC["batch"]
    g = torch.Generator().manual_seed(SPEC["seed"])
    for _ in range(SPEC["steps"]):
        starts = torch.randint(0, len(ids) - seq - 1, (bs,), generator=g)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(hf_dir, safe_serialization=True)
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False})
    )


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) failed: {rc}")
    tmp.replace(dst)


def build_tiny_ggufs(corpus: Path, root: Path) -> dict[str, Path]:
    """{'bf16', 'q8_0', 'q4_0'} -> GGUF paths of the tiny trained Llama under root."""
    import llama_cpp

    text = corpus.read_text(encoding="utf-8")
    out = {
        "bf16": root / "tiny-bf16.gguf",
        "q8_0": root / "tiny-q8_0.gguf",
        "q4_0": root / "tiny-q4_0.gguf",
    }
    if all(p.is_file() for p in out.values()):
        return out
    hf = root / "hf"
    if not (hf / "model.safetensors").is_file():
        _train(hf, text)
    if not out["bf16"].is_file():
        tmp = out["bf16"].with_name("tiny-bf16.gguf.tmp")
        subprocess.run(
            [
                sys.executable,
                str(vendored_llama_cpp() / "convert_hf_to_gguf.py"),
                str(hf),
                "--outtype",
                "bf16",
                "--outfile",
                str(tmp),
            ],
            check=True,
            capture_output=True,
        )
        tmp.replace(out["bf16"])
    _quantize(out["bf16"], out["q8_0"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
    _quantize(out["bf16"], out["q4_0"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
    return out


if __name__ == "__main__":
    from qatgguf.evaluate import default_corpus

    for name, path in build_tiny_ggufs(default_corpus(), Path(sys.argv[1])).items():
        print(name, path, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
