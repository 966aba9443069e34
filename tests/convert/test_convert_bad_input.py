"""Broken checkpoints: each error names the file and tensor; nothing is left at the output."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from qatgguf.convert import convert, plan_conversion
from qatgguf.errors import CheckpointError, NonFiniteError, UnknownTensorError, UnsupportedArchitectureError


@pytest.fixture()
def ckpt(make_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("dense"), dst)
    return dst


def _index(ckpt):
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _shard_of(ckpt, tensor):
    return ckpt / _index(ckpt)["weight_map"][tensor]


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def _no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".gguf") or ".tmp" in p.name]


Q = "model.layers.1.self_attn.q_proj.weight"


def test_truncated_shard(ckpt, tmp_path):
    shard = _shard_of(ckpt, Q)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated") as ei:
        convert(ckpt, out, recipe="bf16")
    assert ei.value.file == str(shard) and ei.value.tensor
    _no_output(out)


def test_index_names_missing_shard(ckpt, tmp_path):
    shard = _shard_of(ckpt, Q)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json.*{shard.name}.*does not exist"):
        plan_conversion(ckpt, recipe="bf16")


def test_index_names_tensor_not_in_shard(ckpt):
    idx = _index(ckpt)
    other = sorted(set(idx["weight_map"].values()) - {idx["weight_map"][Q]})[0]
    idx["weight_map"][Q] = other
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"tensor '{Q}'.*does not hold it"):
        plan_conversion(ckpt, recipe="bf16")


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["Llama7ForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=r"config.json.*'Llama7ForCausalLM'"):
        plan_conversion(ckpt, recipe="bf16")


def test_unknown_tensor(ckpt):
    shard = _shard_of(ckpt, Q)
    _rewrite_header(shard, lambda h: h.__setitem__("model.layers.1.self_attn.q_proj.bias", h.pop(Q)))
    idx = _index(ckpt)
    idx["weight_map"]["model.layers.1.self_attn.q_proj.bias"] = idx["weight_map"].pop(Q)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(UnknownTensorError, match=r"q_proj.bias"):
        plan_conversion(ckpt, recipe="bf16")


def test_overlapping_offsets(ckpt):
    shard = _shard_of(ckpt, Q)

    def edit(h):
        names = [n for n in h if n != "__metadata__"]
        a, b = sorted(names, key=lambda n: h[n]["data_offsets"][0])[:2]
        span = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] >= span and h[a]["dtype"] == h[b]["dtype"]:
            h[b]["shape"] = h[b]["shape"]
            h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + span]
        else:
            h[b]["data_offsets"] = [h[b]["data_offsets"][0] - 2, h[b]["data_offsets"][1] - 2]

    _rewrite_header(shard, edit)
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*(overlaps|data_offsets)"):
        plan_conversion(ckpt, recipe="bf16")


def test_offsets_past_end(ckpt):
    shard = _shard_of(ckpt, Q)
    _rewrite_header(shard, lambda h: h[Q].__setitem__("data_offsets", [h[Q]["data_offsets"][0] + 10**9,
                                                                      h[Q]["data_offsets"][1] + 10**9]))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{Q}'.*outside"):
        plan_conversion(ckpt, recipe="bf16")


def test_unsupported_dtype(ckpt):
    shard = _shard_of(ckpt, Q)
    _rewrite_header(shard, lambda h: h[Q].__setitem__("dtype", "I16"))
    with pytest.raises(CheckpointError, match=rf"tensor '{Q}'.*dtype I16"):
        plan_conversion(ckpt, recipe="bf16")


def test_shape_disagrees_with_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_attention_heads"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"self_attn\.[qo]_proj\.weight.*disagrees with config.json"):
        plan_conversion(ckpt, recipe="bf16")


def test_nan_in_tensor(ckpt, tmp_path):
    shard = _shard_of(ckpt, Q)
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = 8 + n + json.loads(raw[8:8 + n])[Q]["data_offsets"][0]
    raw[begin + 2 * 130: begin + 2 * 131] = np.array([0x7FC0], dtype="<u2").tobytes()  # bf16 NaN, row 1
    shard.write_bytes(bytes(raw))
    out = tmp_path / "m.gguf"
    with pytest.raises(NonFiniteError, match=rf"{shard.name}: tensor '{Q}': row 1 holds NaN"):
        convert(ckpt, out, recipe="bf16", workdir=tmp_path / "w")
    assert not out.exists()


def test_pickle_checkpoint_refused(ckpt):
    for p in ckpt.glob("*.safetensors*"):
        p.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*pickle.*safetensors"):
        plan_conversion(ckpt, recipe="bf16")


def test_unknown_recipe_and_unmatched_pattern(ckpt):
    from qatgguf.errors import ConfigError
    from qatgguf.recipes import Recipe, Rule, load_recipe

    with pytest.raises(ConfigError, match="unknown recipe 'q9_9'"):
        load_recipe("q9_9")
    base = load_recipe("bf16")
    bad = Recipe(name="bad", file_type="MOSTLY_BF16", default="BF16",
                 rules=base.rules + (Rule(pattern=r"^nonexistent\.weight$", qtype="Q8_0"),))
    with pytest.raises(ConfigError, match=r"nonexistent"):
        plan_conversion(ckpt, recipe=bad)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors",
                                  "model.bin", ".."])
def test_index_weight_map_names_only_bare_shards(ckpt, name):
    idx = _index(ckpt)
    idx["weight_map"][Q] = name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"index.json: tensor '{Q}': weight_map names file .*bare") as ei:
        plan_conversion(ckpt, recipe="bf16")
    assert ei.value.tensor == Q


@pytest.mark.parametrize("edit, rule", [
    (lambda e: e.__setitem__("shape", [-1, *e["shape"][1:]]), "non-negative integer dimensions"),
    (lambda e: e.__setitem__("shape", [float(e["shape"][0]), *e["shape"][1:]]), "non-negative integer dimensions"),
    (lambda e: e.__setitem__("shape", [str(e["shape"][0]), *e["shape"][1:]]), "non-negative integer dimensions"),
    (lambda e: e.__setitem__("shape", [True, *e["shape"][1:]]), "non-negative integer dimensions"),
    (lambda e: e.__setitem__("data_offsets", [0]), "must be two non-negative integers"),
    (lambda e: e.__setitem__("extra", 1), r"must be \{dtype, shape, data_offsets\}"),
])
def test_header_entries_are_checked(ckpt, edit, rule):
    shard = _shard_of(ckpt, Q)
    _rewrite_header(shard, lambda h: edit(h[Q]))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{Q}': .*{rule}"):
        plan_conversion(ckpt, recipe="bf16")


@pytest.mark.parametrize("meta", [["a"], {"k": 1}, "text"])
def test_header_metadata_must_map_strings(ckpt, meta):
    shard = _shard_of(ckpt, Q)
    _rewrite_header(shard, lambda h: h.__setitem__("__metadata__", meta))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '__metadata__': .*strings to strings"):
        plan_conversion(ckpt, recipe="bf16")


def test_header_nesting_is_refused_before_parsing(ckpt):
    shard = _shard_of(ckpt, Q)
    _rewrite_header(shard, lambda h: h.__setitem__("__metadata__", {"x": "y"}))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    body = deep + b" " * (-len(deep) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: header nests deeper"):
        plan_conversion(ckpt, recipe="bf16")


def test_overlap_inside_a_long_tensor_is_found(ckpt):
    """A tensor inside a long one with an empty tensor between them in start order: the
    neighbours never overlap, the sweep over the furthest end finds it."""
    shard = _shard_of(ckpt, Q)

    def edit(h):
        names = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])
        by_size = sorted(names, key=lambda n: h[n]["data_offsets"][1] - h[n]["data_offsets"][0])
        small = by_size[0]
        long_ = by_size[-1]
        a, b = h[long_]["data_offsets"]
        span = h[small]["data_offsets"][1] - h[small]["data_offsets"][0]
        assert b - a > 2 * span
        # put the small tensor in the last part of the long one, an empty one in between
        h[small]["data_offsets"] = [b - span, b]
        h["model.layers.1.empty"] = {"dtype": "BF16", "shape": [0], "data_offsets": [a + 2, a + 2]}

    _rewrite_header(shard, edit)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor .* overlaps"):
        plan_conversion(ckpt, recipe="bf16")
