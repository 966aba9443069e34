"""`grid: auto`: the plan leaves the type of a tensor to detection, the shard task detects it
on the full tensor and records it, assembly takes it from the parts; the single-process
path writes the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qatgguf.convert import assemble, convert, convert_shard, plan_conversion, read_manifest
from qatgguf.convert.plan import ConversionPlan
from qatgguf.errors import GGUFWriteError
from qatgguf.fixtures.qat import GRIDS, export_weight, initial_scale

# checkpoint tensor -> the grid it is put on (None: left as it is)
GRIDDED = {
    "model.layers.0.mlp.gate_proj.weight": "TQ2_0",  # rows of 128: no TQ2_0 block fits
    "model.layers.0.self_attn.q_proj.weight": "Q4_0",
    "model.layers.1.self_attn.o_proj.weight": "Q8_0",
    "model.layers.1.per_layer_input_gate.weight": "Q8_0",
    "model.embed_tokens.weight": "TQ2_0",  # rows of 128 as well
    "model.layers.2.mlp.down_proj.weight": "Q4_0",
}


def _on_grid(t: torch.Tensor, qtype: str, seed: int) -> torch.Tensor:
    fmt = GRIDS[qtype]
    w = t.float()
    if w.shape[-1] % fmt.block:  # a 2-bit grid on rows of 128: two rows per block
        w = w.reshape(-1, fmt.block)
    log_mag, sign = initial_scale(w, fmt, "t")
    log_mag = log_mag + 0.1 * torch.randn(log_mag.shape, generator=torch.Generator().manual_seed(seed))
    return export_weight(w, log_mag, sign, fmt, "t")[0].reshape(t.shape)


@pytest.fixture(scope="module")
def gridded_ckpt(make_ckpt, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    src = make_ckpt("ple")
    out = tmp_path_factory.mktemp("gridded") / "ckpt"
    shutil.copytree(src, out)
    for shard in sorted(out.glob("model-*.safetensors")):
        tensors = load_file(shard)
        hit = False
        for i, name in enumerate(sorted(tensors)):
            if name in GRIDDED:
                tensors[name] = _on_grid(tensors[name], GRIDDED[name], seed=i)
                hit = True
        if hit:
            save_file(tensors, shard, metadata={"format": "pt"})
    return out


def test_plan_records_candidates_not_types(gridded_ckpt) -> None:
    plan = plan_conversion(gridded_ckpt, recipe="UD-Q2_K_XL")
    jobs = plan.tensors
    q = jobs["blk.0.attn_q.weight"]
    assert q.grid == "auto" and q.qtype == "Q4_0" and q.candidates == ("Q4_0", "Q8_0")
    assert jobs["token_embd.weight"].qtype == "Q8_0"  # the output rule on rows of 128 (Q6_K -> Q8_0)
    assert jobs["blk.0.attn_norm.weight"].grid is None and jobs["blk.0.attn_norm.weight"].qtype == "F32"
    assert jobs["per_layer_model_proj.weight"].qtype == "BF16"
    assert set(plan.auto_tensors) == {n for n, j in jobs.items() if j.grid == "auto"}
    again = ConversionPlan.from_json(plan.to_json())
    assert again == plan
    with pytest.raises(ValueError, match="decided by grid detection in the shard task"):
        plan.tensor_infos()
    with pytest.raises(ValueError, match="type TQ2_0 is not one the plan allows"):
        q.resolved("TQ2_0")


def test_parts_and_single_process_write_the_same_file(gridded_ckpt, tmp_path) -> None:
    from gguf import GGUFReader

    direct = convert(gridded_ckpt, tmp_path / "direct.gguf", recipe="UD-Q2_K_XL")[0]
    plan = plan_conversion(gridded_ckpt, recipe="UD-Q2_K_XL")
    parts = [Path(convert_shard(plan, i, tmp_path / f"part-{i}.bin").path) for i in range(len(plan.shards))]
    assembled = assemble(plan, parts, tmp_path / "parts.gguf")[0]
    assert direct.read_bytes() == assembled.read_bytes()
    types = {t.name: t.tensor_type.name for t in GGUFReader(direct).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.1.attn_output.weight"] == "Q8_0"
    assert types["blk.1.inp_gate.weight"] == "Q8_0"
    assert types["blk.2.ffn_down.weight"] == "Q4_0"
    # a 2-bit grid whose block does not fit the row is still a 4-bit grid
    assert types["blk.0.ffn_gate.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q4_0"
    # random weights: on no grid, what llama-quantize gives them
    # (the per-layer embedding: Q6_K for tied embeddings, on rows of 96 Q8_0)
    assert types["blk.0.attn_k.weight"] == "Q4_0" and types["per_layer_token_embd.weight"] == "Q8_0"
    recorded = {t["name"]: t["type"] for p in parts for t in read_manifest(p)["tensors"]}
    assert {n: recorded[n] for n in types} == types


def test_detected_types_decode_to_the_checkpoint(gridded_ckpt, tmp_path) -> None:
    from qatgguf.convert import gguf_exactness

    out = convert(gridded_ckpt, tmp_path / "m.gguf", recipe="UD-Q2_K_XL")[0]
    report = {t.tensor: t for t in gguf_exactness(out, gridded_ckpt).tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.attn_output.weight", "blk.1.inp_gate.weight",
                 "blk.2.ffn_down.weight", "blk.0.ffn_gate.weight", "token_embd.weight"):
        assert report[name].exact == report[name].blocks, name
    assert report["blk.0.attn_k.weight"].fraction < 0.5  # plain weights: the reference Q4_0


def test_assembly_refuses_types_the_plan_does_not_allow(gridded_ckpt, tmp_path) -> None:
    plan = plan_conversion(gridded_ckpt, recipe="UD-Q2_K_XL")
    other = plan_conversion(gridded_ckpt, recipe="bf16")
    parts = [Path(convert_shard(other, i, tmp_path / f"part-{i}.bin").path) for i in range(len(other.shards))]
    with pytest.raises(GGUFWriteError, match=r"has type BF16, which the plan does not allow \(Q4_0, Q8_0"):
        assemble(plan, parts, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_ud_q2_k_xl_runs_in_llama_cpp(gridded_ckpt, tmp_path) -> None:
    import llama_cpp

    out = convert(gridded_ckpt, tmp_path / "m.gguf", recipe="UD-Q2_K_XL")[0]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_batch=128, logits_all=True, n_gpu_layers=0,
                          n_threads=2, verbose=False)
    llm.eval([2, 100, 200, 300, 400])
    assert np.isfinite(np.array(llm.scores[: llm.n_tokens])).all()
    meta = json.loads(json.dumps({k: str(v) for k, v in llm.metadata.items()}))
    assert meta["general.file_type"] == "10"  # MOSTLY_Q2_K
