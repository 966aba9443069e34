"""The projector file (mmproj) against llama.cpp's own converter
(`convert_hf_to_gguf.py --mmproj`, vendored by llama-cpp-python 0.3.36): same metadata
keys, types and values, same tensor names, shapes and types, the same bytes, for every
tiny Gemma 4 size with a tower (E2B/E4B vision + audio, 26B-A4B/31B vision, 12B unified).

Deliberate differences, each checked below:
- a checkpoint without processor_config.json / preprocessor_config.json: llama.cpp's
  converter stops with `KeyError: 'image_mean'`; ours raises `CheckpointError` naming the
  file and the fix. (The tiny family ships no processor config, so the fixture below adds
  the one file both converters need, the same for both.)
- a text-only checkpoint: `plan_mmproj` returns None and `write_mmproj` raises
  `CheckpointError` (llama.cpp's converter fails with `vision_config / audio_config not found`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qatgguf.convert.mmproj import map_mmproj_name, mmproj_filename, plan_mmproj, write_mmproj
from qatgguf.errors import CheckpointError

PROCESSOR = {"image_processor": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16},
             "processor_class": "Gemma4Processor"}
slow = pytest.mark.slow


def _link_ckpt(src: Path, dest: Path, *, processor: bool = True) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "processor_config.json":  # written (or left out) below, never through the link
            (dest / f.name).symlink_to(f)
    if processor:
        (dest / "processor_config.json").write_text(json.dumps(PROCESSOR), encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def mm_ckpt(tiny_family, tmp_path_factory):
    """The tiny size with a processor_config.json beside it (directory name = size name,
    which general.name/finetune are read from)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = _link_ckpt(tiny_family[name], tmp_path_factory.mktemp("mm") / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def oracle_mmproj(vendored_llama_cpp, mm_ckpt, tmp_path_factory):
    """llama.cpp's projector file, converted once per (size, type) per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str) -> Path:
        key = (name, outtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("oracle") / f"mmproj-{outtype}.gguf"
            res = subprocess.run([sys.executable, str(vendored_llama_cpp / "convert_hf_to_gguf.py"),
                                  str(mm_ckpt(name)), "--mmproj", "--outtype", outtype, "--outfile", str(out)],
                                 check=False, capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-3000:]
            cache[key] = out
        return cache[key]

    return get


def _read(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: ([int(t) for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
               for t in r.tensors}
    return fields, tensors


def _assert_same(ours: Path, ref: Path) -> None:
    our_f, our_t = _read(ours)
    ref_f, ref_t = _read(ref)
    assert sorted(our_f) == sorted(ref_f)
    assert {k: (our_f[k], v) for k, v in ref_f.items() if our_f[k] != v} == {}
    assert sorted(our_t) == sorted(ref_t)
    assert {n: (our_t[n][:2], v[:2]) for n, v in ref_t.items() if our_t[n][:2] != v[:2]} == {}
    assert [n for n, v in ref_t.items() if our_t[n][2] != v[2]] == []
    # beyond the requirement: same KV and tensor order, so the very same file
    assert ours.read_bytes() == ref.read_bytes()


EXPECT = {  # (projector, audio projector or None, a tensor only that layout has)
    "E2B": ("gemma4v", "gemma4a", "a.blk.0.conv_dw.weight"),
    "E4B": ("gemma4v", "gemma4a", "a.blk.0.per_dim_scale.weight"),
    "12B": ("gemma4uv", "gemma4ua", "v.patch_norm.3.weight"),
    "26B-A4B": ("gemma4v", None, "v.blk.0.attn_q.weight"),
    "31B": ("gemma4v", None, "v.blk.0.attn_q.weight"),
}


@pytest.mark.parametrize("name", [
    "E2B", "12B", pytest.param("E4B", marks=slow), pytest.param("26B-A4B", marks=slow),
    pytest.param("31B", marks=slow)])
def test_bf16_same_file_as_llama_cpp(mm_ckpt, oracle_mmproj, tmp_path, name):
    ref = oracle_mmproj(name, "bf16")
    ours = write_mmproj(mm_ckpt(name), tmp_path / mmproj_filename("bf16"), outtype="bf16")
    assert ours.name == "mmproj-BF16.gguf"
    _assert_same(ours, ref)
    fields, tensors = _read(ours)
    proj, aproj, marker = EXPECT[name]
    assert fields["general.architecture"][1] == "clip" and fields["general.type"][1] == "mmproj"
    assert fields["clip.vision.projector_type"][1] == proj
    assert fields.get("clip.audio.projector_type", (None, None))[1] == aproj
    assert marker in tensors
    assert not [n for n in tensors if not n.startswith(("v.", "a.", "mm."))]  # no text tensor leaks in
    assert {t[0] for t in tensors.values()} <= {"BF16", "F32"}
    assert fields["clip.vision.image_mean"][1] == [0.5, 0.5, 0.5]


@slow
@pytest.mark.parametrize("name", ["E2B", "12B", "31B"])
def test_f16_same_file_as_llama_cpp(mm_ckpt, oracle_mmproj, tmp_path, name):
    ref = oracle_mmproj(name, "f16")
    ours = write_mmproj(mm_ckpt(name), tmp_path / mmproj_filename("f16"), outtype="f16")
    assert ours.name == "mmproj-F16.gguf"
    _assert_same(ours, ref)
    # patch_embd follows the outtype under F16 (llama.cpp keeps it F32 under BF16)
    assert _read(ours)[1]["v.patch_embd.weight"][0] == "F16"


def test_plan_is_plain_data_and_streams_in_plan_order(mm_ckpt):
    plan = plan_mmproj(mm_ckpt("E2B"), outtype="bf16")
    assert plan is not None and plan.audio and plan.projector == "gemma4v"
    by = {t.gguf_name: t for t in plan.tensors}
    # the HWC patch projection becomes a CHW conv kernel; the depthwise conv loses its unit axis
    pe = by["v.patch_embd.weight"]
    assert pe.transform == "patch_hwc_to_chw" and pe.shape == (pe.src_shape[0], 3, 16, 16) and pe.qtype == "F32"
    dw = by["a.blk.0.conv_dw.weight"]
    assert dw.transform == "squeeze_dw" and len(dw.shape) == 2 and dw.qtype == "F32"
    assert by["a.blk.0.per_dim_scale.weight"].transform == "softplus"
    assert by["a.blk.0.attn_q.input_max"].shape == (1,)  # scalars become 1-D
    assert by["mm.input_projection.weight"].qtype == "BF16"
    unified = plan_mmproj(mm_ckpt("12B"), outtype="f16")
    ub = {t.gguf_name: t for t in unified.tensors}
    assert unified.projector == "gemma4uv"
    assert ub["v.position_embd.weight"].transform == "pos_swap"
    assert ub["v.patch_embd.weight"].transform == "cols_chw" and ub["v.patch_embd.weight"].qtype == "F16"
    assert ub["v.patch_norm.1.weight"].transform == "rows_chw"


@pytest.mark.parametrize(("hf", "gguf_name"), [
    ("model.vision_tower.encoder.layers.3.self_attn.q_proj.linear.weight", "v.blk.3.attn_q.weight"),
    ("model.vision_tower.encoder.layers.3.self_attn.q_proj.input_max", "v.blk.3.attn_q.input_max"),
    ("model.vision_tower.encoder.layers.0.layer_scalar", "v.blk.0.out_scale.weight"),
    ("model.audio_tower.layers.2.self_attn.per_dim_scale", "a.blk.2.per_dim_scale.weight"),
    ("model.audio_tower.subsample_conv_projection.layer1.norm.weight", "a.conv1d.1.norm.weight"),
    ("model.vision_embedder.pos_norm.bias", "v.patch_norm.3.bias"),
    ("model.vision_embedder.pos_embedding", "v.position_embd.weight"),
    ("model.vision_tower.encoder.layers.0.self_attn.rotary.weight", None),
])
def test_name_table(hf, gguf_name):
    assert map_mmproj_name(hf) == gguf_name


def test_text_only_checkpoint_has_no_projector(make_ckpt, tmp_path):
    ckpt = make_ckpt("dense")
    assert plan_mmproj(ckpt) is None
    with pytest.raises(CheckpointError, match="no vision tower"):
        write_mmproj(ckpt, tmp_path / "mmproj-BF16.gguf")
    assert not list(tmp_path.iterdir())


def test_missing_processor_config_is_named(tiny_family, tmp_path):
    ckpt = _link_ckpt(tiny_family["31B"], tmp_path / "31B", processor=False)
    with pytest.raises(CheckpointError, match=r"processor_config\.json.*image_mean|image_mean.*processor_config"):
        write_mmproj(ckpt, tmp_path / "out" / "mmproj-BF16.gguf")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unknown_tower_tensor_and_bad_type(mm_ckpt, tmp_path):
    from safetensors.numpy import save_file

    from qatgguf.errors import UnknownTensorError

    ckpt = _link_ckpt(mm_ckpt("31B"), tmp_path / "31B", processor=False)
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    save_file({"model.vision_tower.encoder.layers.0.mystery.weight": np.zeros((4, 4), np.float32)},
              str(ckpt / "model-extra.safetensors"))
    idx["weight_map"]["model.vision_tower.encoder.layers.0.mystery.weight"] = "model-extra.safetensors"
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(UnknownTensorError, match="mystery") as ei:
        plan_mmproj(ckpt)
    assert "model-extra.safetensors" in str(ei.value)
    with pytest.raises(ValueError, match="q4_0"):
        plan_mmproj(mm_ckpt("31B"), outtype="q4_0")


def test_cli_writes_mmproj_next_to_output(mm_ckpt, tmp_path):
    out = tmp_path / "dist" / "31B-BF16.gguf"
    res = subprocess.run([sys.executable, "-m", "qatgguf.cli", "convert", str(mm_ckpt("31B")), "-o", str(out),
                          "--recipe", "bf16", "--mmproj", "--mmproj-type", "bf16"], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    mm = tmp_path / "dist" / "mmproj-BF16.gguf"
    assert out.is_file() and mm.is_file()
    assert str(mm) in res.stdout
    fields, _ = _read(mm)
    assert fields["clip.vision.projector_type"][1] == "gemma4v"
    assert fields["clip.vision.projection_dim"][1] == _read(out)[0]["gemma4.embedding_length"][1]


MTMD_SCRIPT = """
import sys, llama_cpp
from llama_cpp import mtmd_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_gpu_layers=0, n_threads=2, verbose=False)
p = mtmd_cpp.mtmd_context_params_default()
p.use_gpu = False
p.n_threads = 2
ctx = mtmd_cpp.mtmd_init_from_file(sys.argv[2].encode(), llm.model, p)
assert ctx, "mtmd_init_from_file failed"
print("vision", mtmd_cpp.mtmd_support_vision(ctx), "audio", mtmd_cpp.mtmd_support_audio(ctx))
mtmd_cpp.mtmd_free(ctx)
"""


@pytest.mark.parametrize("name", ["26B-A4B", "31B"])
def test_text_and_mmproj_load_together_in_mtmd(mm_ckpt, tmp_path, name):
    """llama.cpp's mtmd loads our text GGUF and projector together (and runs its warm-up
    graph on a dummy image). Vision-only sizes: on the tiny E2B/E4B (audio) and 12B
    (unified) layouts, mtmd's warm-up aborts on llama.cpp's own converter output too
    (GGML_ASSERT on the tiny tower geometry), so those are compared byte for byte above."""
    from qatgguf.convert import convert

    text = convert(mm_ckpt(name), tmp_path / f"{name}-BF16.gguf", recipe="bf16")[0]
    mm = write_mmproj(mm_ckpt(name), tmp_path / "mmproj-BF16.gguf")
    res = subprocess.run([sys.executable, "-c", MTMD_SCRIPT, str(text), str(mm)], check=False, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "vision True audio False" in res.stdout
