"""Recipes mirror llama-quantize's default choices (ref: src/llama-quant.cpp)."""

from __future__ import annotations

import pytest

from qatgguf.errors import ConfigError
from qatgguf.recipes import available_recipes, load_recipe


def test_shipped_recipes():
    assert {"f32", "bf16", "f16", "q8_0", "q4_0", "UD-Q4_K_XL", "UD-Q2_K_XL"} <= set(available_recipes())


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


@pytest.mark.parametrize(("name", "n_expert", "want"), [
    ("blk.0.attn_k.weight", 8, "Q8_0"),
    ("blk.0.attn_v.weight", 8, "Q8_0"),
    ("blk.0.attn_q.weight", 8, "Q4_0"),
    ("blk.0.attn_output.weight", 8, "Q4_0"),
    ("blk.0.attn_k.weight", 128, "Q4_0"),  # the real 26B-A4B: 128 experts
    ("blk.0.attn_v.weight", 0, "Q4_0"),
])
def test_q4_0_mirrors_the_eight_expert_rule(name, n_expert, want):
    """ref: src/llama-quant.cpp llama_tensor_get_type_impl, categories ATTENTION_K/V."""
    assert load_recipe("q4_0").choose(name, (512, 2816), facts={"n_expert": n_expert}).qtype == want


def test_grid_auto_leaves_quantized_tensors_to_detection():
    r = load_recipe("UD-Q2_K_XL")
    ch = r.choose("blk.3.ffn_up.weight", (512, 256), facts={"n_expert": 0})
    assert (ch.grid, ch.qtype, ch.candidates) == ("auto", "Q4_0", ("TQ2_0", "Q4_0", "Q8_0"))
    assert ch.allowed == ("TQ2_0", "Q4_0", "Q8_0", "Q4_0")
    # a row that no 256-block fits: only the 32-block grids
    assert r.choose("blk.3.ffn_down.weight", (256, 288)).candidates == ("Q4_0", "Q8_0")
    # on no grid: what llama-quantize gives it (the q4_0 recipe's choice)
    assert r.choose("token_embd.weight", (2048, 256)).qtype == "Q6_K"
    assert r.choose("blk.0.attn_k.weight", (128, 256), facts={"n_expert": 8}).qtype == "Q8_0"
    # never the tensors llama.cpp keeps unquantized
    for name, shape, want in [("blk.0.attn_norm.weight", (256,), "F32"),
                              ("per_layer_model_proj.weight", (640, 256), "BF16"),
                              ("blk.0.ffn_gate_inp.weight", (8, 256), "F32")]:
        ch = r.choose(name, shape)
        assert (ch.qtype, ch.grid, ch.candidates) == (want, None, ())
    assert r.file_type == "MOSTLY_Q2_K"


@pytest.mark.parametrize(("item", "message"), [
    ({"pattern": "x", "type": "Q8_0", "grid": "lattice"}, "grid must be absent, 'qat' or 'auto'"),
    ({"pattern": "x", "type": "Q8_0", "when": {"n_layers": 8}}, r"unknown model facts \['n_layers'\]"),
    ({"pattern": "x", "type": "Q8_0", "when": 8}, "`when` must map model facts to integers"),
])
def test_bad_rule_fields(item, message):
    from qatgguf.recipes.recipe import _rule

    with pytest.raises(ConfigError, match=message):
        _rule(item, "recipe 'bad'")
