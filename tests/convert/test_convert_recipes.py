"""Recipes mirror llama-quantize's default choices (ref: src/llama-quant.cpp)."""

from __future__ import annotations

import pytest

from qatgguf.errors import ConfigError
from qatgguf.recipes import available_recipes, load_recipe


def test_shipped_recipes():
    assert {"f32", "bf16", "f16", "q8_0", "q4_0"} <= set(available_recipes())


@pytest.mark.parametrize(("recipe", "name", "shape", "want"), [
    ("q4_0", "token_embd.weight", (262144, 2560), "Q6_K"),
    ("q4_0", "per_layer_token_embd.weight", (262144, 8960), "Q6_K"),
    ("q4_0", "token_embd.weight", (1024, 2816 + 32), "Q8_0"),  # row not a multiple of 256
    ("q4_0", "blk.3.ffn_down_exps.weight", (128, 2816, 704), "Q4_0"),  # 704 = 22 blocks of 32
    ("q4_0", "blk.3.ffn_down.weight", (2816, 2112), "Q4_0"),
    ("q4_0", "blk.3.ffn_down.weight", (128, 48), "F16"),  # not a multiple of 32 at all
    ("q4_0", "blk.3.attn_norm.weight", (2816,), "F32"),
    ("q4_0", "blk.3.ffn_gate_inp.weight", (128, 2816), "F32"),
    ("q4_0", "blk.3.ffn_gate_inp.scale", (2816,), "F32"),
    ("q4_0", "blk.3.layer_output_scale.weight", (1,), "F32"),
    ("q4_0", "per_layer_model_proj.weight", (8960, 2560), "BF16"),
    ("q8_0", "token_embd.weight", (262144, 2560), "Q8_0"),
    ("q8_0", "blk.0.attn_k.weight", (512, 2560), "Q8_0"),
    ("bf16", "blk.0.attn_k.weight", (512, 2560), "BF16"),
    ("bf16", "rope_freqs.weight", (256,), "F32"),
    ("f16", "blk.0.ffn_gate_up_exps.weight", (128, 1408, 2816), "F16"),
    ("f32", "token_embd.weight", (262144, 2560), "F32"),
])
def test_choices(recipe, name, shape, want):
    assert load_recipe(recipe).choose(name, shape).qtype == want


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'zz'.*bf16"):
        load_recipe("zz")
