"""A text-only Gemma 4 checkpoint large enough that converting one shard takes a moment
(so a test can kill a worker in the middle of it), with the tiny family's tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_medium(out: Path, tokenizer_from: Path, *, hidden: int = 768, layers: int = 4, seed: int = 0,
                 shard: str = "40MB") -> Path:
    """Random bf16 Gemma4ForCausalLM (about 35M parameters), sharded; built once per path."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    vocab = len(json.loads((tokenizer_from / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = Gemma4TextConfig(
        vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        num_attention_heads=hidden // 128, num_key_value_heads=2, head_dim=128, global_head_dim=256,
        sliding_window=64, max_position_embeddings=4096, final_logit_softcapping=30.0, initializer_range=0.02,
        hidden_size_per_layer_input=0, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
        attention_k_eq_v=True, num_global_key_value_heads=1)
    cfg.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg).eval().to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, tmp / name)
    tmp.rename(out)
    return out
