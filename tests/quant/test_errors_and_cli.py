"""Bad input gets errors that name the tensor, the rule and the fix; the lattice command."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qatgguf.cli import main
from qatgguf.errors import BlockSizeError, CheckpointError, NonFiniteError, UnknownQuantTypeError
from qatgguf.quant import api, dequantize, quantize, resolve_type
from qatgguf.convert.grid_report import lattice_report

from .qat_synth import qat4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_tensor_and_first_bad_row(
    bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 64)  # the bad row sits in a later chunk
    x = np.zeros((10, 64), np.float32)
    x[7, 5] = bad
    x[9, 0] = bad
    with pytest.raises(NonFiniteError, match=r"'blk\.3\.attn_q\.weight'.*row 7, column 5"):
        quantize(x, "Q4_0", name="blk.3.attn_q.weight")
    with pytest.raises(ValueError, match="row 7"):  # also a ValueError
        quantize(x, T.Q8_0)


@pytest.mark.parametrize(
    ("qtype", "block", "fallback"),
    [("Q4_K", 256, "Q5_0"), ("Q6_K", 256, "Q8_0"), ("TQ2_0", 256, "Q4_0")],
)
def test_row_length_names_type_block_and_fallback(qtype: str, block: int, fallback: str) -> None:
    with pytest.raises(
        BlockSizeError,
        match=rf"'token_embd\.weight'.*{qtype}.*block size {block}.*row length is 320.*{fallback}",
    ):
        quantize(np.zeros((2, 320), np.float32), qtype, name="token_embd.weight")
    with pytest.raises(BlockSizeError, match="Q8_0 needs rows .* block size 32"):
        quantize(np.zeros((2, 40), np.float32), "Q8_0")


def test_unknown_type() -> None:
    with pytest.raises(UnknownQuantTypeError, match="Q4_X"):
        resolve_type("Q4_X")
    with pytest.raises(UnknownQuantTypeError, match="IQ2_XXS"):
        quantize(np.zeros((1, 256), np.float32), "IQ2_XXS")
    assert (
        resolve_type("q4_k") is T.Q4_K
        and resolve_type(12) is T.Q4_K
        and resolve_type(T.Q4_K) is T.Q4_K
    )


def test_dequantize_checks_row_bytes() -> None:
    with pytest.raises(ValueError, match="18-byte blocks"):
        dequantize(np.zeros((1, 20), np.uint8), "Q4_0")


def _write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, dict] = {}
    blobs = []
    off = 0
    for name, arr in tensors.items():
        if arr.dtype == np.float32:  # store as bf16 (the arrays are bf16-valued)
            raw = (arr.view(np.uint32) >> 16).astype(np.uint16).tobytes()
            dt = "BF16"
        else:
            raw, dt = arr.tobytes(), "F32"
        header[name] = {
            "dtype": dt,
            "shape": list(arr.shape),
            "data_offsets": [off, off + len(raw)],
        }
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_lattice_command_text_and_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    w8, _, _ = qat4(512, "max/-8", "bf16", seed=1)
    w7, _, _ = qat4(512, "amax/7", "f32", seed=2)
    plain = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    plain = (plain.view(np.uint32) & 0xFFFF0000).view(np.float32)
    norm = np.ones(256, np.float32)
    _write_safetensors(
        tmp_path / "model.safetensors",
        {
            "model.layers.0.mlp.up_proj.weight": w8.reshape(64, 256),
            "model.layers.0.self_attn.q_proj.weight": w7.reshape(64, 256),
            "model.embed_tokens.weight": plain,
            "model.norm.weight": norm[:128],
        },
    )
    assert main(["lattice", str(tmp_path), "--json"]) == 0
    rows = {r["tensor"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    }
    up = rows["model.layers.0.mlp.up_proj.weight"]
    assert up["q4_fraction"] == 1.0 and up["signature"]["scale_rounding"] == "bf16"
    assert "Q4_0-style" in up["signature"]["recipe"]
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["q4_fraction"] == 1.0 and "[-7, 7]" in q["signature"]["recipe"]
    assert rows["model.embed_tokens.weight"]["q4_fraction"] == 0.0
    assert main(["lattice", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in text and "Q4_0-style" in text


def test_lattice_command_bad_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00")
    assert main(["lattice", str(tmp_path)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        lattice_report(tmp_path / "empty")
