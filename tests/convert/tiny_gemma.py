"""Tiny random Gemma checkpoints that test the converter rather than numerical noise.

q_norm/k_norm are scaled by head_dim**-0.25 so attention scores have sd ~1 (as in a trained
model), 1-D scales are perturbed away from 1 so a dropped scale or a +1 norm shift shows,
and the tokenizer splits newline runs first so llama.cpp's gemma4 pre-tokenizer and
transformers agree (ref: llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GEMMA4)."""

from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>", "<|channel>",
            "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
            "<tool_response|>", '<|"|>', "<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>",
            "<audio|>", "<|video|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' "
                 "else m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|turn>model\n{% endif %}")


def eval_text() -> str:
    return Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")[:12000]


def build_tokenizer(out: Path, vocab_size: int = 1024) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:60]
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n+"), "isolated"),
        pre_tokenizers.Metaspace("▁", prepend_scheme="never", split=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + bytes_,
                                  initial_alphabet=[], limit_alphabet=200, show_progress=False)
    tok.train(files, trainer)
    tok.pre_tokenizer = None  # runtime: the normalizer alone, like Gemma's tokenizer.json
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   additional_special_tokens=SPECIALS[5:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


VARIANTS: dict[str, dict] = {
    # 31B-like: k_eq_v global layer with its own kv-head count
    "dense": dict(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                  intermediate_size=256, num_key_value_heads=2, attention_k_eq_v=True,
                  num_global_key_value_heads=1),
    # 26B-A4B-like: shared dense MLP + experts (expert width 96: not a multiple of 256)
    "moe": dict(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                intermediate_size=96, num_key_value_heads=2, attention_k_eq_v=True,
                num_global_key_value_heads=1, enable_moe_block=True, num_experts=4, top_k_experts=2,
                moe_intermediate_size=96),
    # E2B-like: per-layer embeddings, KV-shared layers with double-wide MLPs; as in E2B the
    # last non-shared layer is full and the one before it sliding (llama.cpp reuses those two)
    "ple": dict(num_hidden_layers=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                intermediate_size=192, num_key_value_heads=1, hidden_size_per_layer_input=16,
                num_kv_shared_layers=3, use_double_wide_mlp=True),
    # a transformers-5.24 config whose global head size equals head_dim
    "same_hd": dict(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                    intermediate_size=128, num_key_value_heads=2, global_head_dim=32),
}


def build_gemma4(out: Path, tokenizer_dir: Path, variant: str, *, seed: int = 0, legacy: bool = False,
                 shard: str = "150KB") -> Path:
    """Save a random Gemma4ForCausalLM (bf16 safetensors, sharded) with the tokenizer."""
    import shutil

    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    opts = dict(VARIANTS[variant])
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    base = dict(vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=128,
                num_attention_heads=4, head_dim=32, global_head_dim=64, sliding_window=32,
                max_position_embeddings=4096, final_logit_softcapping=5.0, initializer_range=0.02,
                hidden_size_per_layer_input=0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                tie_word_embeddings=True)
    base.update(opts)
    cfg = Gemma4TextConfig(**base)
    cfg.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("layer_scalar"):
                lo, hi = (0.3, 1.0) if name.endswith("layer_scalar") else (0.5, 1.5)
                p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.mul_(p.shape[0] ** -0.25)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.7 + 0.3)
    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=shard)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    if legacy:
        c = json.loads((out / "config.json").read_text())
        plc = c.pop("per_layer_config", None) or {}
        full = [v for k, v in plc.items()]
        c["global_head_dim"] = full[0].get("head_dim", c["head_dim"]) if full else 64
        c["num_global_key_value_heads"] = full[0].get("num_key_value_heads") if full else None
        (out / "config.json").write_text(json.dumps(c, indent=2))
    return out


def reference_logits(ckpt: Path, ids: list[int]):
    """fp32 transformers logits of a checkpoint reloaded from disk."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def build_sp_tokenizer(out: Path, vocab_size: int = 1024) -> Path:
    """A sentencepiece BPE tokenizer.model (Gemma 3 style: byte fallback, no dummy prefix)
    plus the tokenizer.json transformers converts from it."""
    import io

    import sentencepiece as spm
    from transformers import GemmaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(Path(f).read_text(encoding="utf-8", errors="ignore")
                     for f in sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:40])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = GemmaTokenizer.from_pretrained(out)  # converts tokenizer.model to tokenizer.json
    tok.save_pretrained(out)
    return out


def save_like_transformers5(tokenizer_dir: Path, out: Path) -> Path:
    """The tokenizer as transformers 5's `save_pretrained` writes it: tokenizer.json and
    tokenizer_config.json, no sentencepiece tokenizer.model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    cfg = out / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8"))
    data.pop("vocab_file", None)  # a path into the folder it was loaded from
    cfg.write_text(json.dumps(data, indent=2), encoding="utf-8")
    if (out / "tokenizer.model").exists():
        raise RuntimeError("transformers wrote tokenizer.model; this is not the transformers 5 layout")
    return out


def build_gemma3(out: Path, tokenizer_dir: Path, *, seed: int = 0, shard: str = "150KB",
                 vocab_size: int = 1024) -> Path:
    import shutil

    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # llama.cpp fixes Gemma 3's layer pattern at 5 sliding + 1 full: six layers show both kinds
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=32,
                           layer_types=["sliding_attention"] * 5 + ["full_attention"], query_pre_attn_scalar=32,
                           max_position_embeddings=4096, initializer_range=0.02, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2, final_logit_softcapping=5.0)
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:  # Gemma 3 norms compute x * (1 + w): perturb w around 0
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=shard)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out
