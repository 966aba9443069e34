"""GGUF metadata (the KV list) for a checkpoint, computed the way llama.cpp's converter
computes it, so the two files carry the same keys, types and values.

The KV calls follow conversion/base.py (ModelBase.prepare_metadata, TextModel.
set_gguf_parameters) and conversion/gemma.py (Gemma3Model, Gemma4Model,
Gemma4UnifiedModel); gguf-py's `GGUFWriter` is used only as the collector of those calls,
so every key gets the value type gguf-py gives it. Tokenizer arrays come from gguf-py's
`LlamaHfVocab` and `SpecialVocab` (ref: gguf-py/gguf/vocab.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import gguf
from gguf import GGUFValueType

from qatgguf.convert.arch import ArchSpec
from qatgguf.errors import CheckpointError
from qatgguf.gguf.writer import KV, array_sub_type

log = logging.getLogger(__name__)

# tokens llama.cpp always renders, so that the chat parser can read them
# ref: conversion/gemma.py Gemma4Model.set_vocab
_VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                   "<tool_response|>", '<|"|>'}


@dataclass(frozen=True)
class TextGeometry:
    """What the metadata and the shape checks need, per layer."""

    n_layer: int
    hidden: int
    vocab: int
    n_head: int
    layer_types: tuple[str, ...]
    head_dim: tuple[int, ...]
    n_kv: tuple[int, ...]
    kv_override: bool  # full layers take their kv-head count from the per-layer config
    n_ff: tuple[int, ...]
    ple_dim: int
    ple_vocab: int
    n_expert: int
    expert_ff: int
    n_kv_shared: int


def _layer_value(tc: Any, hp: dict[str, Any], i: int, key: str) -> int:
    plc = getattr(tc, "per_layer_config", None)
    if plc is not None:
        return int(getattr(plc[i], key))
    return int(hp[key])


def text_geometry(tc: Any, hp: dict[str, Any], family: str) -> TextGeometry:
    """Per-layer geometry from a transformers text config object and its dict.

    transformers 5.24 keeps the global-layer head size in `per_layer_config` and omits it
    when it equals `head_dim`; older configs carry `global_head_dim`, which the config class
    turns into `per_layer_config` on load. Reading each layer's own config covers both,
    including the equal case llama.cpp's converter cannot read.
    """
    n = int(hp["num_hidden_layers"])
    types = tuple(hp.get("layer_types") or ["full_attention"] * n)
    head_dim = tuple(_layer_value(tc, hp, i, "head_dim") for i in range(n))
    n_kv = tuple(_layer_value(tc, hp, i, "num_key_value_heads") for i in range(n))
    plc_d = hp.get("per_layer_config") or {}
    kv_override = any("num_key_value_heads" in (plc_d.get(str(i)) or plc_d.get(i) or {})
                      for i in range(n) if types[i] == "full_attention")
    shared = int(hp.get("num_kv_shared_layers") or 0)
    ff = int(hp["intermediate_size"])
    double = bool(hp.get("use_double_wide_mlp", False))
    n_ff = tuple(ff * 2 if double and i >= n - shared else ff for i in range(n))
    ple = int(hp.get("hidden_size_per_layer_input") or 0)
    return TextGeometry(
        n_layer=n, hidden=int(hp["hidden_size"]), vocab=int(hp["vocab_size"]),
        n_head=int(hp["num_attention_heads"]), layer_types=types, head_dim=head_dim, n_kv=n_kv,
        kv_override=kv_override, n_ff=n_ff, ple_dim=ple,
        ple_vocab=int(hp.get("vocab_size_per_layer_input") or hp["vocab_size"]),
        n_expert=int(hp.get("num_experts") or 0),
        expert_ff=int(hp.get("moe_intermediate_size") or 0),
        n_kv_shared=shared,
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, Enum):
        return int(v.value)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8")
    if isinstance(v, (list, tuple)):
        # token arrays hold 262k items of one type: convert them without a call per item
        t0 = type(v[0]) if v else None
        if t0 is not None and all(type(x) is t0 for x in v):
            if t0 in (int, float, str, bool):
                return list(v)
            if t0 is bytes:
                return [x.decode("utf-8") for x in v]
            if issubclass(t0, Enum):
                return [int(x.value) for x in v]
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return v


def collected_kvs(writer: gguf.GGUFWriter) -> list[KV]:
    out = []
    for key, val in writer.kv_data[0].items():
        vtype = int(val.type)
        sub = val.sub_type
        if vtype == GGUFValueType.ARRAY and sub is None:
            sub = array_sub_type(val.value)
        out.append(KV(key, vtype, _jsonable(val.value), None if sub is None else int(sub)))
    return out


def param_counts(tensors: Sequence[tuple[str, Sequence[int]]]) -> tuple[int, int, int, int]:
    """(total, shared, expert, expert_count) as gguf-py counts them over the written tensors
    (ref: gguf_writer.py GGUFWriter.get_total_parameter_count)."""
    total = shared = expert = expert_sum = n_exp = 0
    for name, shape in tensors:
        size = math.prod(shape)
        if "_exps." in name and len(shape) >= 3:
            count = shape[0]  # numpy order: the expert axis leads (ggml ne[2])
            expert += size // count
            expert_sum += count
            n_exp += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_exp if n_exp else 0)


def _add_text_params(w: gguf.GGUFWriter, hp: dict[str, Any], *, n_layer: int, ftype: int) -> None:
    """ref: conversion/base.py TextModel.set_gguf_parameters (the keys Gemma uses)."""

    def find(keys: Sequence[str]) -> Any:
        k = next((k for k in keys if k in hp), None)
        return None if k is None else hp[k]

    w.add_block_count(n_layer)
    if (v := find(["max_position_embeddings", "n_ctx", "n_positions", "max_length"])) is not None:
        w.add_context_length(v)
    if (v := find(["hidden_size", "n_embd", "dim"])) is not None:
        w.add_embedding_length(v)
    if (v := find(["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size"])) is not None:
        w.add_feed_forward_length(v)
    if (v := find(["num_attention_heads", "n_head", "n_heads"])) is not None:
        w.add_head_count(v)
    if (v := find(["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(v)
    if hp.get("is_causal") is False:
        w.add_causal_attention(False)
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if "full_attention" not in rope and "sliding_attention" not in rope and hp.get("rope_theta") is not None:
        rope = {**rope, "rope_theta": hp["rope_theta"]}
        if hp.get("rope_local_base_freq") is not None:
            rope["sliding_attention"] = {"rope_theta": hp["rope_local_base_freq"]}
    rp = rope.get("full_attention", rope)
    rope_type = rp.get("rope_type")
    if rope_type == "linear" and rp.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    if (theta := rp.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(theta)
    if (v := find(["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(v)
    if (v := find(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(v)
    if (v := find(["num_local_experts", "num_experts", "n_routed_experts"])) is not None:
        w.add_expert_count(v)
    if (v := find(["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])) is not None:
        w.add_expert_used_count(v)
    if (v := hp.get("head_dim")) is not None:
        w.add_key_length(v)
        w.add_value_length(v)
    w.add_file_type(ftype)
    return None


def _add_gemma3_params(w: gguf.GGUFWriter, hp: dict[str, Any]) -> None:
    """ref: conversion/gemma.py Gemma3Model.set_gguf_parameters."""
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if "full_attention" not in rope and "sliding_attention" not in rope and hp.get("rope_theta") is not None:
        rope = {**rope, "rope_theta": hp["rope_theta"]}
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if cap := hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cap)
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))


def _add_gemma4_params(w: gguf.GGUFWriter, hp: dict[str, Any], g: TextGeometry, src: Path) -> None:
    """ref: conversion/gemma.py Gemma4Model.set_gguf_parameters, Gemma4UnifiedModel."""
    w.add_shared_kv_layers(g.n_kv_shared)
    w.add_embedding_length_per_layer_input(g.ple_dim)
    swa = [t == "sliding_attention" for t in g.layer_types]
    w.add_sliding_window_pattern(swa)
    full = [i for i, t in enumerate(g.layer_types) if t == "full_attention"]
    hd_swa = int(hp["head_dim"])
    hd_full = g.head_dim[full[0]] if full else hd_swa
    w.add_key_length(hd_full)
    w.add_value_length(hd_full)
    w.add_key_length_swa(hd_swa)
    w.add_value_length_swa(hd_swa)
    if (v := hp.get("expert_intermediate_size", hp.get("moe_intermediate_size"))) is not None:
        w.add_expert_feed_forward_length(v)
    if hp.get("use_double_wide_mlp", False):
        w.add_feed_forward_length(list(g.n_ff))
    if g.kv_override:
        w.add_head_count_kv(list(g.n_kv))
    rope = hp.get("rope_parameters") or {}
    w.add_rope_dimension_count(int(hd_full))
    w.add_rope_dimension_count_swa(int(hd_swa * rope.get("partial_rotary_factor", 1.0)))
    if hp.get("_unified"):
        gen = src / "generation_config.json"
        if gen.is_file():
            supp = json.loads(gen.read_text(encoding="utf-8")).get("suppress_tokens")
            if supp is not None:
                # ref: gguf-py (vendored) Keys.LLM.SUPPRESS_TOKENS, an int32 array
                w.add_array(f"{w.arch}.suppress_tokens", list(supp))


class _VocabOnce:
    """A tokenizer whose `get_vocab()` is built once: the Rust tokenizer builds a fresh
    dict on every call (about 0.5 s at 262k tokens), and gguf-py's LlamaHfVocab asks once
    per special token. Everything else passes through."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._vocab: dict[str, int] | None = None

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self._tokenizer.get_vocab()
        return self._vocab

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class _HfVocab(gguf.LlamaHfVocab):
    """gguf-py's LlamaHfVocab (same tokens, scores and types) over `_VocabOnce`."""

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @tokenizer.setter
    def tokenizer(self, tok: Any) -> None:
        self._tok = _VocabOnce(tok)


def _add_vocab_gemma4(w: gguf.GGUFWriter, src: Path) -> None:
    """ref: conversion/gemma.py Gemma4Model.set_vocab."""
    try:
        vocab = _HfVocab(src)
    except FileNotFoundError as exc:
        raise CheckpointError(f"tokenizer missing ({exc}); copy tokenizer.json and "
                              "tokenizer_config.json into the checkpoint", file=str(src)) from None
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in _VISIBLE_TOKENS else toktype)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True)
    special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def _looks_special(text: str) -> bool:
    """ref: conversion/base.py TextModel.does_token_look_special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def sentencepiece_vocab(src: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types from tokenizer.model, padded to the model's vocab size.

    ref: conversion/base.py TextModel._create_vocab_sentencepiece (token types are
    gguf.TokenType values: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise CheckpointError("reading tokenizer.model needs the `sentencepiece` package: "
                              "pip install sentencepiece", file=str(src / "tokenizer.model")) from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(src / "tokenizer.model"))
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [5] * n
    for i in range(min(n, sp.vocab_size())):
        t = 1
        if sp.IsUnknown(i):
            t = 2
        elif sp.IsControl(i):
            t = 3
        elif sp.IsUnused(i):
            t = 5
        elif sp.IsByte(i):
            t = 6
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), t
    added = src / "added_tokens.json"
    if added.is_file():
        for key, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < n:
                tokens[i], scores[i], types[i] = key.encode("utf-8"), -1000.0, 4
    tcfg = src / "tokenizer_config.json"
    if tcfg.is_file():
        for i, data in json.loads(tcfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            i = int(i)
            if i >= n:
                continue
            text: str = data["content"]
            if data.get("special") or _looks_special(text):
                types[i] = 3
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types[i] = 4
            scores[i] = -1000.0
            tokens[i] = text.encode("utf-8")
    return tokens, scores, types


# ref: conversion/base.py TextModel.get_vocab_base_pre: the text whose token ids identify
# a BPE pre-tokenizer (their sha256 is looked up in bpe_pre.json)
_CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple '
    'emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 '
    '33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? '
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)
# The pre-tokenizer llama.cpp gives a SentencePiece-style BPE (spaces normalised to "▁",
# BPE over the whole text): escape whitespace, split on newlines only
# (ref: src/llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_GEMMA4).
SPM_BPE_PRE = "gemma4"


def _known_pre_hashes() -> dict[str, str]:
    from importlib import resources

    data = json.loads(resources.files("qatgguf.convert").joinpath("bpe_pre.json").read_text(encoding="utf-8"))
    return dict(data["hashes"])


def _is_spm_style_bpe(tokenizer_json: dict[str, Any]) -> bool:
    """A BPE whose normalizer turns spaces into "▁" and whose pre-tokenizer, if any, splits
    on spaces (nothing left to split after the normalizer) or on newlines: the pipeline
    transformers' GemmaTokenizer writes."""
    model = tokenizer_json.get("model") or {}
    norm = tokenizer_json.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    replaces_space = any(st.get("type") == "Replace" and (st.get("pattern") or {}).get("String") == " "
                         and st.get("content") == "\u2581" for st in steps)
    pre = tokenizer_json.get("pre_tokenizer")
    pres = (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]) if pre else []
    harmless = all(p.get("type") == "Split" and (p.get("pattern") or {}).get("String") == " " for p in pres)
    return model.get("type") == "BPE" and replaces_space and harmless


def bpe_pre_tokenizer(tokenizer: Any, src: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a BPE tokenizer.json: the name llama.cpp's
    converter looks up by the sha256 of the ids of a fixed text (ref: conversion/base.py
    get_vocab_base_pre; the table in bpe_pre.json). A hash llama.cpp does not know, which
    its converter refuses, is accepted for Gemma's SentencePiece-style BPE: that pipeline
    is llama.cpp's "gemma4" pre-tokenizer, the name its table registers for such
    tokenizers (DFM-Mimir).

    Raises CheckpointError for an unknown hash of any other pipeline."""
    from hashlib import sha256

    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    known = _known_pre_hashes().get(chkhsh)
    if known is not None:
        return known
    tj = src / "tokenizer.json"
    if _is_spm_style_bpe(json.loads(tj.read_text(encoding="utf-8"))):
        return SPM_BPE_PRE
    raise CheckpointError(
        f"BPE pre-tokenizer not recognized (chkhsh {chkhsh}): llama.cpp knows no tokenizer with "
        "these ids for its check text and this pipeline is not SentencePiece-style BPE; add "
        "tokenizer.model, or register the tokenizer in llama.cpp's convert_hf_to_gguf_update.py",
        file=str(tj))


def bpe_vocab(src: Path, vocab_size: int | None) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name of a BPE tokenizer.json, as llama.cpp's
    converter reads them (ref: conversion/base.py TextModel.get_vocab_base): ids the
    tokenizer lacks up to the model's vocab size become "[PAD<i>]" (unused); added tokens
    that are special or look special are control tokens, the other added tokens
    user-defined with "▁" written as a space.

    Raises CheckpointError when the tokenizer cannot be read or has ids beyond the model's
    vocab size."""
    from transformers import AutoTokenizer

    tj = src / "tokenizer.json"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"transformers cannot read the tokenizer: {exc}", file=str(tj)) from None
    vocab: dict[str, int] = tokenizer.vocab
    n = vocab_size if vocab_size is not None else len(vocab)
    top = max(vocab.values())
    if top >= n:
        raise CheckpointError(f"token id {top} is not below the model's vocab_size {n}; the tokenizer "
                              "does not belong to this model: fix vocab_size in config.json", file=str(tj))
    pre = bpe_pre_tokenizer(tokenizer, src)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects control and user-defined tokens pre-normalized
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, pre


def _add_vocab_gemma3(w: gguf.GGUFWriter, src: Path, hp: dict[str, Any]) -> None:
    """ref: conversion/gemma.py Gemma3Model.set_vocab: the sentencepiece tokenizer.model
    when there is one (base.py _set_vocab_sentencepiece), else the BPE vocabulary of
    tokenizer.json (base.py _set_vocab_gpt2), as transformers 5's save_pretrained leaves it."""
    if (src / "tokenizer.model").is_file():
        n = hp.get("vocab_size_per_layer_input", hp.get("vocab_size"))
        tokens, scores, types = sentencepiece_vocab(src, n)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
        w.add_add_space_prefix(False)
        return
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError("Gemma 3 conversion needs tokenizer.model or tokenizer.json and finds "
                              "neither; copy the tokenizer files from the original checkpoint",
                              file=str(src / "tokenizer.json"))
    bpe_tokens, bpe_types, pre = bpe_vocab(src, hp.get("vocab_size"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(bpe_tokens)
    w.add_token_types(bpe_types)
    gguf.SpecialVocab(src, load_merges=True).add_to_gguf(w, quiet=True)


def vocab_rows(src: Path, hp: dict[str, Any]) -> int | None:
    """Rows llama.cpp keeps of the embedding: the sentencepiece vocab (padded to the config's
    size) when tokenizer.model exists, else vocab + added tokens of tokenizer.json
    (ref: conversion/gemma.py Gemma3Model.modify_tensors)."""
    if (src / "tokenizer.model").is_file():
        return int(hp.get("vocab_size_per_layer_input", hp.get("vocab_size")))
    tj = src / "tokenizer.json"
    if not tj.is_file():
        return None
    data = json.loads(tj.read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))


def general_writer(src: Path, *, arch: str, kind: str,
                   tensors: Sequence[tuple[str, Sequence[int]]]) -> gguf.GGUFWriter:
    """An in-memory writer holding the `general.*` keys llama.cpp's converter writes first,
    for the text model and the projector alike (ref: conversion/base.py prepare_metadata)."""
    # gguf-py logs every overwritten key; llama.cpp's converter overwrites on purpose
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)
    w = gguf.GGUFWriter(path=None, arch=arch)
    total, shared, expert, count = param_counts(tensors)
    meta = gguf.Metadata.load(None, src, None, total)
    gen = src / "generation_config.json"
    if gen.is_file():
        # the vendored gguf-py also reads `repetition_penalty` (newer than PyPI gguf 0.19.0)
        rp = json.loads(gen.read_text(encoding="utf-8")).get("repetition_penalty")
        if meta.sampling_penalty_repeat is None and rp is not None:
            meta.sampling_penalty_repeat = rp
    if meta.name is None:
        meta.name = src.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    w.add_type(kind)
    meta.set_gguf_meta_model(w)
    return w


def build_metadata(*, src: Path, spec: ArchSpec, hparams: dict[str, Any], geometry: TextGeometry,
                   file_type: int, tensors: Sequence[tuple[str, Sequence[int]]],
                   unified: bool) -> list[KV]:
    """The ordered KV list of the text GGUF (no split.* keys)."""
    w = general_writer(src, arch=spec.gguf_arch, kind=gguf.GGUFType.MODEL, tensors=tensors)
    hp = {**hparams, "_unified": unified}
    _add_text_params(w, hp, n_layer=geometry.n_layer, ftype=file_type)
    _add_gemma3_params(w, hp)
    if spec.family == "gemma4":
        _add_gemma4_params(w, hp, geometry, src)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if spec.family == "gemma4":
        _add_vocab_gemma4(w, src)
    else:
        _add_vocab_gemma3(w, src, hp)
    return collected_kvs(w)
