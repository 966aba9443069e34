"""Per-architecture tables: HF tensor name -> GGUF name, what is skipped, expected shapes.

The name tables mirror gguf-py's `tensor_mapping.py` for MODEL_ARCH.GEMMA4/GEMMA3 and the
renames in llama.cpp's converter (ref: conversion/gemma.py Gemma4Model.filter_tensors /
modify_tensors: `layer_scalar` -> `layer_output_scale`, `router.scale` ->
`ffn_gate_inp.scale`, `router.per_expert_scale` -> `ffn_down_exps.scale`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from qatgguf.errors import UnsupportedArchitectureError

# HF prefixes of the text stack, tried in order
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")

# vision / audio towers and projectors: they belong to the mmproj file, never the text GGUF
# ref: conversion/base.py TextModel.filter_tensors
MM_RE = re.compile(r"(^|\.)(vision_tower|audio_tower|embed_vision|embed_audio|vision_embedder|"
                   r"multi_modal_projector|vision_model|audio_model)\.")

# (regex over the name without prefix, GGUF name template, shape rule key)
_G4_GLOBAL: list[tuple[str, str, str]] = [
    (r"embed_tokens\.weight", "token_embd.weight", "embd"),
    (r"norm\.weight", "output_norm.weight", "hidden"),
    (r"embed_tokens_per_layer\.weight", "per_layer_token_embd.weight", "ple_embd"),
    (r"per_layer_model_projection\.weight", "per_layer_model_proj.weight", "ple_proj"),
    (r"per_layer_projection_norm\.weight", "per_layer_proj_norm.weight", "ple_dim"),
]
_G4_LAYER: list[tuple[str, str, str]] = [
    (r"input_layernorm\.weight", "attn_norm.weight", "hidden"),
    (r"post_attention_layernorm\.weight", "post_attention_norm.weight", "hidden"),
    (r"pre_feedforward_layernorm\.weight", "ffn_norm.weight", "hidden"),
    (r"post_feedforward_layernorm\.weight", "post_ffw_norm.weight", "hidden"),
    (r"self_attn\.q_proj\.weight", "attn_q.weight", "q"),
    (r"self_attn\.k_proj\.weight", "attn_k.weight", "k"),
    (r"self_attn\.v_proj\.weight", "attn_v.weight", "k"),
    (r"self_attn\.o_proj\.weight", "attn_output.weight", "o"),
    (r"self_attn\.q_norm\.weight", "attn_q_norm.weight", "head_dim"),
    (r"self_attn\.k_norm\.weight", "attn_k_norm.weight", "head_dim"),
    (r"mlp\.gate_proj\.weight", "ffn_gate.weight", "ff_in"),
    (r"mlp\.up_proj\.weight", "ffn_up.weight", "ff_in"),
    (r"mlp\.down_proj\.weight", "ffn_down.weight", "ff_out"),
    (r"layer_scalar", "layer_output_scale.weight", "one"),
    (r"per_layer_input_gate\.weight", "inp_gate.weight", "ple_gate"),
    (r"per_layer_projection\.weight", "proj.weight", "ple_back"),
    (r"post_per_layer_input_norm\.weight", "post_norm.weight", "hidden"),
    (r"router\.proj\.weight", "ffn_gate_inp.weight", "router"),
    (r"router\.scale", "ffn_gate_inp.scale", "hidden"),
    (r"router\.per_expert_scale", "ffn_down_exps.scale", "n_expert"),
    (r"experts\.gate_up_proj", "ffn_gate_up_exps.weight", "exp_gate_up"),
    (r"experts\.down_proj", "ffn_down_exps.weight", "exp_down"),
    (r"pre_feedforward_layernorm_2\.weight", "pre_ffw_norm_2.weight", "hidden"),
    (r"post_feedforward_layernorm_1\.weight", "post_ffw_norm_1.weight", "hidden"),
    (r"post_feedforward_layernorm_2\.weight", "post_ffw_norm_2.weight", "hidden"),
]
_G4_GLOBAL_RE = [(re.compile(p + "$"), g, s) for p, g, s in _G4_GLOBAL]
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)$")
_G4_LAYER_RE = [(re.compile(p + "$"), g, s) for p, g, s in _G4_LAYER]

# tensors a KV-shared layer may carry although it never uses them (original hub E2B/E4B)
_KV_SHARED_SKIP = {"attn_k.weight", "attn_v.weight", "attn_k_norm.weight"}


@dataclass(frozen=True)
class ArchSpec:
    hf_architectures: tuple[str, ...]
    gguf_arch: str
    family: str  # "gemma4" | "gemma3"
    norm_shift: float  # added to every "*norm.weight" (Gemma 3 stores w for (1 + w))


ARCHS: dict[str, ArchSpec] = {}
for _spec in (
    ArchSpec(("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM",
              "Gemma4UnifiedForConditionalGeneration", "Gemma4UnifiedForCausalLM"), "gemma4", "gemma4", 0.0),
    ArchSpec(("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), "gemma3", "gemma3", 1.0),
):
    for _a in _spec.hf_architectures:
        ARCHS[_a] = _spec


def arch_for(config: dict[str, Any], *, file: str) -> ArchSpec:
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(
            "config.json has no `architectures` list; add the model class name "
            f"(one of {sorted(ARCHS)})", file=file)
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    raise UnsupportedArchitectureError(
        f"architecture {archs[0]!r} is not supported; supported: {', '.join(sorted(ARCHS))}", file=file)


@dataclass(frozen=True)
class Mapped:
    gguf_name: str
    shape_rule: str
    layer: int | None


def strip_prefix(name: str) -> str | None:
    for p in TEXT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return None


def map_name(hf_name: str) -> Mapped | None:
    """GGUF name of a text tensor, or None when no rule maps it."""
    rest = strip_prefix(hf_name)
    if rest is None:
        return None
    m = _LAYER_RE.match(rest)
    if m:
        bid, tail = int(m.group(1)), m.group(2)
        for rx, gname, rule in _G4_LAYER_RE:
            if rx.match(tail):
                return Mapped(f"blk.{bid}.{gname}", rule, bid)
        return None
    for rx, gname, rule in _G4_GLOBAL_RE:
        if rx.match(rest):
            return Mapped(gname, rule, None)
    return None


def is_multimodal(hf_name: str) -> bool:
    return MM_RE.search(hf_name) is not None


def is_kv_shared_redundant(gguf_name: str, layer: int | None, first_shared: int) -> bool:
    if layer is None or layer < first_shared:
        return False
    return gguf_name.split(".", 2)[2] in _KV_SHARED_SKIP


ShapeFn = Callable[["Geometry", int | None], tuple[int, ...]]


@dataclass(frozen=True)
class Geometry:
    """Per-layer sizes the checkpoint's tensors must have (from config.json)."""

    vocab: int
    hidden: int
    n_layer: int
    n_head: int
    head_dim: tuple[int, ...]
    n_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    ple_dim: int
    ple_vocab: int
    n_expert: int
    expert_ff: int

    def expected(self, rule: str, layer: int | None) -> tuple[int, ...] | None:
        """Expected HF shape; None where the first dimension is free (embedding rows)."""
        i = layer if layer is not None else 0
        h = self.hidden
        table: dict[str, tuple[int, ...]] = {
            "hidden": (h,),
            "one": (1,),
            "q": (self.n_head * self.head_dim[i], h),
            "k": (self.n_kv[i] * self.head_dim[i], h),
            "o": (h, self.n_head * self.head_dim[i]),
            "head_dim": (self.head_dim[i],),
            "ff_in": (self.n_ff[i], h),
            "ff_out": (h, self.n_ff[i]),
            "ple_embd": (self.ple_vocab, self.n_layer * self.ple_dim),
            "ple_proj": (self.n_layer * self.ple_dim, h),
            "ple_dim": (self.ple_dim,),
            "ple_gate": (self.ple_dim, h),
            "ple_back": (h, self.ple_dim),
            "router": (self.n_expert, h),
            "n_expert": (self.n_expert,),
            "exp_gate_up": (self.n_expert, 2 * self.expert_ff, h),
            "exp_down": (self.n_expert, h, self.expert_ff),
        }
        if rule == "embd":
            return None
        return table[rule]
