"""The vision (and audio) projector file `mmproj-<TYPE>.gguf` of a Gemma 4 checkpoint, as
llama.cpp's `convert_hf_to_gguf.py --mmproj` writes it: GGUF arch `clip`, projector
`gemma4v` (+ `gemma4a` when the checkpoint has an audio tower) or, for the encoder-free
12B layout (`vision_embedder.*`), `gemma4uv` + `gemma4ua`.

Plan first (names, shapes, types and metadata from config.json and the shard headers,
no tensor data), then stream one tensor at a time into a temporary file renamed when
complete.

ref: conversion/gemma.py Gemma4VisionAudioModel, Gemma4UnifiedVisionAudioModel;
conversion/base.py MmprojModel, ModelBase.prepare_tensors (type rules).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from qatgguf import quant
from qatgguf.convert.metadata import collected_kvs, general_writer
from qatgguf.convert.safetensors import DTYPES, nonfinite_rows, read_header
from qatgguf.convert.source import (
    SourceOptions, SourceReader, SourceRef, open_reader, read_shard_header, snapshot)
from qatgguf.errors import CheckpointError, UnknownTensorError
from qatgguf.files import atomic_output
from qatgguf.gguf.writer import KV, GGUFFileWriter, TensorInfo, tensor_nbytes

log = logging.getLogger(__name__)

MMPROJ_PLAN_VERSION = 2
OUTTYPES: dict[str, LlamaFileType] = {"bf16": LlamaFileType.MOSTLY_BF16, "f16": LlamaFileType.MOSTLY_F16}
_QTYPE = {"bf16": "BF16", "f16": "F16"}
UNIFIED_ARCH = "Gemma4UnifiedForConditionalGeneration"
MMPROJ_ARCHES = ("Gemma4ForConditionalGeneration", UNIFIED_ARCH)

# The checkpoint tensors that belong to the projector file (llama.cpp keeps every tensor
# outside `language_model.`; these are the ones a Gemma 4 checkpoint holds there).
# ref: conversion/base.py MmprojModel.filter_tensors
_MM_PREFIX = re.compile(r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio|vision_embedder)\.")

# HF name (without the `.weight`/`.bias`/clip-range suffix) -> GGUF name, per tower. The
# vendored gguf-py holds these in tensor_mapping.py (newer than gguf 0.19.0 on PyPI, which
# lacks the gemma4 unified names), so the Gemma 4 rows are kept here as data.
# ref: gguf-py tensor_mapping.py (MMPROJ rows marked "gemma4"), constants.py TENSOR_NAMES
_VISION_LAYER = {
    "input_layernorm": "ln1", "pre_feedforward_layernorm": "ln2",
    "post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "ffn_post_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "layer_scalar": "out_scale",
}
_AUDIO_LAYER = {
    "feed_forward1.pre_layer_norm": "ffn_norm", "feed_forward1.post_layer_norm": "ffn_post_norm",
    "feed_forward1.ffw_layer_1": "ffn_up", "feed_forward1.ffw_layer_2": "ffn_down",
    "feed_forward2.pre_layer_norm": "ffn_norm_1", "feed_forward2.post_layer_norm": "ffn_post_norm_1",
    "feed_forward2.ffw_layer_1": "ffn_up_1", "feed_forward2.ffw_layer_2": "ffn_down_1",
    "lconv1d.pre_layer_norm": "conv_norm", "lconv1d.conv_norm": "norm_conv",
    "lconv1d.depthwise_conv1d": "conv_dw", "lconv1d.linear_start": "conv_pw1", "lconv1d.linear_end": "conv_pw2",
    "norm_pre_attn": "attn_pre_norm", "norm_post_attn": "attn_post_norm", "norm_out": "ln2",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.post": "attn_out", "self_attn.relative_k_proj": "attn_k_rel",
    "self_attn.per_dim_scale": "per_dim_scale", "self_attn.per_dim_key_scale": "per_dim_k_scale",
}
_GLOBAL = {
    "model.vision_tower.patch_embedder.input_proj": "v.patch_embd",
    "model.vision_tower.patch_embedder.position_embedding_table": "v.position_embd",
    "model.vision_tower.std_bias": "v.std_bias",
    "model.vision_tower.std_scale": "v.std_scale",
    "model.embed_vision.embedding_projection": "mm.input_projection",
    "model.embed_audio.embedding_projection": "mm.a.input_projection",
    "model.audio_tower.subsample_conv_projection.input_proj_linear": "a.input_projection",
    "model.audio_tower.output_proj": "a.pre_encode.out",
    "model.vision_embedder.patch_dense": "v.patch_embd",
    "model.vision_embedder.patch_ln1": "v.patch_norm.1",
    "model.vision_embedder.patch_ln2": "v.patch_norm.2",
    "model.vision_embedder.pos_norm": "v.patch_norm.3",
    "model.vision_embedder.pos_embedding": "v.position_embd",
}
_RANGE_SUFFIXES = ("input_max", "input_min", "output_max", "output_min")
_VISION_RE = re.compile(r"^model\.vision_tower\.encoder\.layers\.(\d+)\.(.+)$")
_AUDIO_RE = re.compile(r"^model\.audio_tower\.layers\.(\d+)\.(.+)$")
_SUBSAMPLE_RE = re.compile(r"^model\.audio_tower\.subsample_conv_projection\.layer(\d+)\.(conv|norm)$")


@dataclass(frozen=True)
class MmprojJob:
    """One tensor of the projector file. Shapes are numpy (row-major) order."""

    gguf_name: str
    hf_name: str
    file: str
    src_dtype: str
    src_shape: tuple[int, ...]
    shape: tuple[int, ...]
    qtype: str
    nbytes: int
    transform: str = "copy"  # copy | softplus | patch_hwc_to_chw | squeeze_dw | pos_swap | cols_chw | rows_chw
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MmprojPlan:
    version: int
    source: SourceRef  # the checkpoint at its planned revision
    hf_architecture: str
    outtype: str
    projector: str  # gemma4v | gemma4uv
    audio: bool
    kvs: tuple[KV, ...]
    tensors: tuple[MmprojJob, ...]

    def tensor_infos(self) -> list[TensorInfo]:
        return [TensorInfo(t.gguf_name, t.shape, int(GGMLQuantizationType[t.qtype]), t.nbytes) for t in self.tensors]

    def to_json(self) -> str:
        d = asdict(self)
        d["kvs"] = [kv.to_json() for kv in self.kvs]
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> MmprojPlan:
        d = json.loads(text)
        if d.get("version") != MMPROJ_PLAN_VERSION:
            raise ValueError(f"projector plan version {d.get('version')} is not {MMPROJ_PLAN_VERSION}; plan again")
        return cls(version=d["version"], source=SourceRef.from_dict(d["source"]),
                   hf_architecture=d["hf_architecture"], outtype=d["outtype"], projector=d["projector"],
                   audio=d["audio"], kvs=tuple(KV.from_json(k) for k in d["kvs"]),
                   tensors=tuple(MmprojJob(**{**t, "src_shape": tuple(t["src_shape"]), "shape": tuple(t["shape"])})
                                 for t in d["tensors"]))


def mmproj_filename(outtype: str) -> str:
    """`mmproj-BF16.gguf` for "bf16": the name the release publishes beside the quants."""
    return f"mmproj-{_check_outtype(outtype).upper()}.gguf"


def _check_outtype(outtype: str) -> str:
    t = outtype.lower()
    if t not in OUTTYPES:
        raise ValueError(f"mmproj type {outtype!r} is not one of {sorted(OUTTYPES)}; llama.cpp keeps the "
                         "projector in BF16 or F16")
    return t


def _split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) where suffix is `.weight`, `.bias`, a clip range, or "" (bare parameter)."""
    head, _, last = name.rpartition(".")
    if last in ("weight", "bias", *_RANGE_SUFFIXES):
        return head, "." + last
    return name, ""


def map_mmproj_name(hf_name: str) -> str | None:
    """GGUF name of a projector tensor, or None when the table does not know it.

    ref: conversion/gemma.py Gemma4VisionAudioModel.modify_tensors (`.linear.` dropped, bare
    parameters get `.weight`, `pos_norm` renamed `patch_ln3`)."""
    stem, suffix = _split_suffix(hf_name)
    stem = stem.removesuffix(".linear")
    suffix = suffix or ".weight"
    if stem in _GLOBAL:
        return _GLOBAL[stem] + suffix
    if m := _VISION_RE.match(stem):
        t = _VISION_LAYER.get(m.group(2))
        return None if t is None else f"v.blk.{m.group(1)}.{t}{suffix}"
    if m := _AUDIO_RE.match(stem):
        t = _AUDIO_LAYER.get(m.group(2))
        return None if t is None else f"a.blk.{m.group(1)}.{t}{suffix}"
    if m := _SUBSAMPLE_RE.match(stem):
        return f"a.conv1d.{m.group(1)}{'.norm' if m.group(2) == 'norm' else ''}{suffix}"
    return None


def _is_audio(hf_name: str) -> bool:
    # ref: Gemma4VisionAudioModel.is_audio_tensor
    return "audio_tower" in hf_name or "embed_audio" in hf_name


def _qtype(hf_name: str, gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The type llama.cpp's converter gives this tensor.

    ref: conversion/base.py ModelBase.prepare_tensors, MmprojModel.tensor_force_quant,
    conversion/gemma.py Gemma4VisionAudioModel.tensor_force_quant."""
    forced: str | None = None
    # the precedence is llama.cpp's: `".conv" in name or ("_conv" in name and ".weight" in name)`
    audio_conv = _is_audio(hf_name) and (".conv" in hf_name or ("_conv" in hf_name and ".weight" in hf_name))
    if audio_conv or "position_embedding_table" in hf_name:
        forced = "F32"
    elif ".patch_embd.weight" in gguf_name:
        forced = "F16" if outtype == "f16" else "F32"
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return "F32"
    if forced is None and (gguf_name.startswith("v.position_embd") or not gguf_name.endswith(".weight")):
        return "F32"
    return forced or _QTYPE[outtype]


def _patch_size(vision: dict[str, Any]) -> int:
    # ref: Gemma4UnifiedVisionAudioModel.modify_tensors
    if "model_patch_size" in vision:
        return int(vision["model_patch_size"])
    return int(vision["patch_size"]) * int(vision["pooling_kernel_size"])


def _transform(hf_name: str, shape: tuple[int, ...], unified: bool, vision: dict[str, Any],
               file: str) -> tuple[str, tuple[int, ...], dict[str, Any]]:
    """(transform, output shape, params) as llama.cpp's modify_tensors reshapes the tensor."""
    if len(shape) == 0:  # scalars (clip ranges) become 1-D
        return "copy", (1,), {}
    if _is_audio(hf_name):
        if hf_name.endswith(("per_dim_scale", "per_dim_key_scale")):
            return "softplus", shape, {}
        if "lconv1d.depthwise_conv1d" in hf_name and hf_name.endswith(".weight"):
            if len(shape) != 3 or shape[1] != 1:
                raise CheckpointError(f"depthwise conv weight has shape {list(shape)}, expected [C, 1, K]; "
                                      "the checkpoint is not a Gemma 4 audio tower", file=file, tensor=hf_name)
            return "squeeze_dw", (shape[0], shape[2]), {}
        return "copy", shape, {}
    if unified:
        if hf_name.endswith("pos_embedding"):
            if len(shape) != 3:
                raise CheckpointError(f"pos_embedding has shape {list(shape)}, expected [posemb, 2, D]",
                                      file=file, tensor=hf_name)
            return "pos_swap", (shape[1], shape[0], shape[2]), {}
        if "patch_dense.weight" in hf_name or "patch_ln1.weight" in hf_name or "patch_ln1.bias" in hf_name:
            p = _patch_size(vision)
            n = shape[-1] if "patch_dense" in hf_name else shape[0]
            if n != p * p * 3:
                raise CheckpointError(f"has {n} patch values but config.json implies {p}x{p}x3 = {p * p * 3} "
                                      "(vision_config patch_size x pooling_kernel_size); fix config.json",
                                      file=file, tensor=hf_name)
            return ("cols_chw" if "patch_dense" in hf_name else "rows_chw"), shape, {"p": p}
        return "copy", shape, {}
    if hf_name.endswith("patch_embedder.input_proj.weight"):
        n_embd, k = shape
        p = int((k // 3) ** 0.5)
        if p * p * 3 != k:
            raise CheckpointError(f"patch projection has {k} inputs, not 3 x patch_size^2", file=file,
                                  tensor=hf_name)
        return "patch_hwc_to_chw", (n_embd, 3, p, p), {"p": p}
    return "copy", shape, {}


def _load_config(src: Path) -> dict[str, Any]:
    """config.json as llama.cpp's converter reads it (AutoConfig(...).to_dict())."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=False).to_dict()
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"transformers cannot read config.json: {exc}", file=str(src / "config.json")) from None


def _processor_config(src: Path) -> dict[str, Any]:
    """preprocessor_config.json then processor_config.json merged, as llama.cpp does.

    ref: conversion/base.py MmprojModel.__init__"""
    out: dict[str, Any] = {}
    for fname, inner in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        p = src / fname
        if p.is_file():
            try:
                cfg = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"not valid JSON ({exc})", file=str(p)) from None
            if isinstance(cfg.get(inner), dict):
                cfg = {**cfg, **cfg[inner]}
            out.update(cfg)
    return out


def _metadata(*, src: Path, cfg: dict[str, Any], unified: bool, audio: bool, outtype: str,
              tensors: list[tuple[str, tuple[int, ...]]]) -> list[KV]:
    """ref: conversion/base.py ModelBase.prepare_metadata, MmprojModel.set_gguf_parameters,
    conversion/gemma.py Gemma4VisionAudioModel/Gemma4UnifiedVisionAudioModel.set_gguf_parameters."""
    w = general_writer(src, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], kind=gguf.GGUFType.MMPROJ,
                       tensors=tensors)

    cfg_file = str(src / "config.json")
    text = {**cfg, **(cfg.get("text_config") or {})}
    n_embd_text = text.get("hidden_size", text.get("n_embd", 0))
    if not n_embd_text:
        raise CheckpointError("text_config.hidden_size is missing; the projector width needs it", file=cfg_file)
    vision = dict(cfg["vision_config"])
    vision["image_size"] = 224  # ref: Gemma4VisionAudioModel.__init__ (unused by llama.cpp, but required)
    aud = dict(cfg.get("audio_config") or {}) if audio else {}
    if audio:
        aud["feat_in"] = aud.get("input_feat_size", 128)
        if "hidden_size" in aud:
            aud["intermediate_size"] = aud["hidden_size"] * 4
    if unified:
        vision.update(hidden_size=vision.get("mm_embed_dim"), intermediate_size=0, num_layers=0, num_attention_heads=0)
        aud.update(hidden_size=aud.get("audio_embed_dim"), intermediate_size=0, num_layers=0, num_attention_heads=0)

    def find(obj: dict[str, Any], keys: tuple[str, ...], what: str) -> Any:
        for k in keys:
            if k in obj and obj[k] is not None:
                return obj[k]
        raise CheckpointError(f"{what} has none of {list(keys)}; llama.cpp's projector needs one", file=cfg_file)

    blocks = ("n_layers", "num_hidden_layers", "n_layer", "num_layers", "depth", "layers", "encoder_layers",
              "vt_num_hidden_layers")  # ref: MmprojModel.n_block_keys
    w.add_file_type(OUTTYPES[outtype])
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(n_embd_text)
    w.add_vision_image_size(vision["image_size"])
    w.add_vision_patch_size(find(vision, ("patch_size",), "vision_config"))
    w.add_vision_embedding_length(find(vision, ("hidden_size", "width", "vt_hidden_size"), "vision_config"))
    w.add_vision_feed_forward_length(find(vision, ("intermediate_size", "vt_intermediate_size"), "vision_config"))
    w.add_vision_block_count(find(vision, blocks, "vision_config"))
    w.add_vision_head_count(find(vision, ("num_attention_heads", "num_heads", "heads", "vt_num_attention_heads"),
                                 "vision_config"))
    proc = _processor_config(src)
    for k in ("image_mean", "image_std"):
        if k not in proc:
            raise CheckpointError(
                f"no {k!r} in processor_config.json / preprocessor_config.json; the projector file stores the "
                "image normalisation: copy processor_config.json from the original model repository",
                file=str(src / "processor_config.json"))
    w.add_vision_image_mean(proc["image_mean"])
    w.add_vision_image_std(proc["image_std"])
    if audio:
        w.add_clip_has_audio_encoder(True)
        w.add_audio_projection_dim(n_embd_text)
        w.add_audio_embedding_length(find(aud, ("hidden_size",), "audio_config"))
        w.add_audio_feed_forward_length(find(aud, ("intermediate_size",), "audio_config"))
        w.add_audio_block_count(find(aud, blocks, "audio_config"))
        w.add_audio_head_count(find(aud, ("num_attention_heads",), "audio_config"))
    # gguf 0.19.0 lacks GEMMA4UV/GEMMA4UA, so the projector names are written as strings
    # ref: gguf-py constants.py VisionProjectorType
    w.add_clip_vision_projector_type("gemma4v")
    w.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    if audio:
        w.add_clip_audio_projector_type("gemma4a")
        w.add_audio_num_mel_bins(aud["feat_in"])
        w.add_audio_attention_layernorm_eps(aud.get("layer_norm_eps", 1e-6))
    if unified:
        w.add_clip_vision_projector_type("gemma4uv")
        w.add_clip_audio_projector_type("gemma4ua")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return collected_kvs(w)


def plan_mmproj(src: Path | str | SourceRef, *, outtype: str = "bf16",
                source_options: dict[str, Any] | SourceOptions | None = None,
                hash_local: bool = True, reader: SourceReader | None = None) -> MmprojPlan | None:
    """Plan the projector file of a checkpoint (a directory, `hf://`, `s3://` source or a
    resolved `SourceRef`), reading its small files and shard headers only.

    Returns None when the checkpoint has no vision tower (a text-only checkpoint has no
    projector to write). Raises `CheckpointError` for a config or processor config that
    does not describe the towers, `UnknownTensorError` for a tower tensor with no GGUF name,
    `ValueError` for an outtype other than bf16/f16."""
    outtype = _check_outtype(outtype)
    opts = source_options if isinstance(source_options, SourceOptions) else SourceOptions.from_dict(source_options)
    ref = snapshot(src, options=opts, hash_local=hash_local)
    reader = reader if reader is not None and reader.ref == ref else open_reader(ref, opts)
    with reader.small_files() as meta:
        return _plan_mmproj(ref, reader, meta, outtype)


def _plan_mmproj(ref: SourceRef, reader: Any, src: Path, outtype: str) -> MmprojPlan | None:
    from qatgguf.convert.plan import shard_files

    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError("config.json is missing; a checkpoint directory needs it", file=ref.label("config.json"))
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    arches = raw.get("architectures") or []
    hf_arch = next((a for a in arches if a in MMPROJ_ARCHES), None)
    if hf_arch is None or not raw.get("vision_config"):
        return None
    unified = hf_arch == UNIFIED_ARCH
    files, _ = shard_files(ref, src)
    found: list[tuple[str, Any]] = []
    for f in files:
        h = read_shard_header(reader, f)
        found += [(f, e) for n, e in h.tensors.items() if _MM_PREFIX.match(n)]
    if not any(not _is_audio(e.name) for _, e in found):
        return None
    audio = any(_is_audio(e.name) for _, e in found)
    if audio and not raw.get("audio_config"):
        raise CheckpointError("the checkpoint holds audio tower tensors but config.json has no audio_config; "
                              "fix config.json", file=ref.label("config.json"),
                              tensor=next(e.name for _, e in found if _is_audio(e.name)))
    cfg = _load_config(src)
    jobs: list[MmprojJob] = []
    seen: dict[str, str] = {}
    for f, e in found:
        file = ref.label(f)
        gname = map_mmproj_name(e.name)
        if gname is None:
            raise UnknownTensorError(f"no projector (mmproj) name for this tensor in {hf_arch}; it is not part of "
                                     "a known Gemma 4 vision/audio layout: remove it or report the layout",
                                     file=file, tensor=e.name)
        if gname in seen:
            raise CheckpointError(f"maps to {gname!r} like {seen[gname]!r}; duplicate tensor", file=file, tensor=e.name)
        seen[gname] = e.name
        transform, shape, params = _transform(e.name, e.shape, unified, cfg["vision_config"], file)
        qt = _qtype(e.name, gname, shape, outtype)
        jobs.append(MmprojJob(gguf_name=gname, hf_name=e.name, file=f, src_dtype=e.dtype, src_shape=e.shape,
                              shape=shape, qtype=qt, nbytes=tensor_nbytes(shape, GGMLQuantizationType[qt]),
                              transform=transform, params=params))
    kvs = _metadata(src=src, cfg=cfg, unified=unified, audio=audio, outtype=outtype,
                    tensors=[(j.gguf_name, j.shape) for j in jobs])
    return MmprojPlan(version=MMPROJ_PLAN_VERSION, source=ref, hf_architecture=hf_arch, outtype=outtype,
                      projector="gemma4uv" if unified else "gemma4v", audio=audio, kvs=tuple(kvs), tensors=tuple(jobs))


def _chw_perm(p: int) -> np.ndarray:
    # ggml's im2col yields CHW order, the weights expect HWC: perm[i] = HWC index of CHW position i
    # ref: Gemma4UnifiedVisionAudioModel.modify_tensors
    i = np.arange(p * p * 3)
    ch, row, col = i // (p * p), (i % (p * p)) // p, i % p
    return row * p * 3 + col * 3 + ch


def _tensor_bytes(job: MmprojJob, fd: int, begin: int, file: str) -> bytes:
    item, np_dtype = DTYPES[job.src_dtype]
    n = math.prod(job.src_shape)
    buf = os.pread(fd, n * item, begin)
    if len(buf) != n * item:
        raise CheckpointError("file ends inside this tensor; the shard is truncated: download it again",
                              file=file, tensor=job.hf_name)
    raw = np.frombuffer(buf, dtype=np_dtype)
    # clip ranges (input_max, ...) are +-Inf where a linear is not clipped; weights must be finite
    is_range = job.hf_name.endswith(_RANGE_SUFFIXES)
    bad = np.empty(0) if is_range else nonfinite_rows(raw.reshape(job.src_shape) if job.src_shape else raw.reshape(1, 1),
                                                      job.src_dtype)
    if bad.size:
        raise CheckpointError(f"row {int(bad[0])} holds NaN or Inf; the checkpoint is corrupt: use a clean one",
                              file=file, tensor=job.hf_name)
    if job.transform == "copy" and job.src_dtype == job.qtype:
        return buf  # BF16/F16/F32 kept as they are: the F32 round trip gives back the same bytes
    # llama.cpp widens every dtype but F16/F32 to F32 before it reshapes and converts
    # ref: conversion/base.py ModelBase.prepare_tensors
    if job.src_dtype == "BF16":
        x = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        x = raw.astype(np.dtype(np_dtype).newbyteorder("="))
    x = x.reshape(job.src_shape)
    t = job.transform
    if t == "softplus":
        import torch  # the same float32 kernel as the reference, so the bytes agree

        x = torch.nn.functional.softplus(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    elif t == "squeeze_dw":
        x = x.reshape(job.shape)
    elif t == "pos_swap":
        x = x.transpose(1, 0, 2)
    elif t == "patch_hwc_to_chw":
        p = job.params["p"]
        x = x.reshape(job.src_shape[0], p, p, 3).transpose(0, 3, 1, 2)
    elif t == "cols_chw":
        x = x[:, _chw_perm(job.params["p"])]
    elif t == "rows_chw":
        x = x[_chw_perm(job.params["p"])]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(job.shape)
    if job.qtype == "F32":
        return x.tobytes()
    return quant.quantize(x.reshape(1) if x.ndim == 0 else x, job.qtype, name=job.hf_name).tobytes()


def mmproj_shards(plan: MmprojPlan) -> list[str]:
    """The shard files that hold tower tensors: all a projector task needs to fetch."""
    return list(dict.fromkeys(j.file for j in plan.tensors))


def write_mmproj_plan(plan: MmprojPlan, out: Path | str, *, root: Path | None = None) -> Path:
    """Write a planned projector file, one tensor at a time, under a temporary name renamed
    when complete. `root` holds the tower shards (`mmproj_shards`), by default the local
    checkpoint folder. Raises `CheckpointError` if a shard changed since planning."""
    out = Path(out)
    src = Path(root) if root is not None else plan.source.local_dir
    if src is None:
        raise CheckpointError("the checkpoint is remote: fetch the tower shards first and pass root",
                              file=plan.source.label())
    headers = {f: read_header(src / f) for f in dict.fromkeys(j.file for j in plan.tensors)}
    fds = {f: os.open(src / f, os.O_RDONLY) for f in headers}
    try:
        with atomic_output(out) as tmp, open(tmp, "wb") as fh:
            w = GGUFFileWriter(fh, plan.kvs, plan.tensor_infos())
            w.write_header()
            for job in plan.tensors:
                e = headers[job.file].tensors.get(job.hf_name)
                if e is None or e.shape != job.src_shape or e.dtype != job.src_dtype:
                    raise CheckpointError("tensor missing or changed since planning: plan again",
                                          file=str(src / job.file), tensor=job.hf_name)
                w.begin_tensor(job.gguf_name)
                w.write(_tensor_bytes(job, fds[job.file], e.begin, str(src / job.file)))
            w.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def write_mmproj(src: Path | str, out: Path | str, *, outtype: str = "bf16",
                 source_options: dict[str, Any] | None = None) -> Path:
    """Write the projector file of `src` to `out` (conventionally `mmproj-BF16.gguf`): what
    `convert_hf_to_gguf.py SRC --mmproj --outtype bf16|f16` writes. Returns `out`.

    Raises `CheckpointError` when the checkpoint has no vision tower (nothing to write),
    or for bad input (see `plan_mmproj`); `ValueError` for an outtype other than bf16/f16."""
    plan = plan_mmproj(src, outtype=outtype, source_options=source_options, hash_local=False)
    if plan is None:
        raise CheckpointError("the checkpoint has no vision tower (no vision_config or no model.vision_tower.* / "
                              "model.vision_embedder.* tensors), so there is no projector to write: drop --mmproj "
                              "for a text-only model", file=str(src))
    if plan.source.local_dir is not None:
        return write_mmproj_plan(plan, out)
    from qatgguf.convert.source import fetch_checkpoint
    from qatgguf.paths import cache_root

    (cache_root() / "work").mkdir(parents=True, exist_ok=True)
    opts = source_options if isinstance(source_options, SourceOptions) else SourceOptions.from_dict(source_options)
    with tempfile.TemporaryDirectory(prefix="qatgguf-mmproj-", dir=cache_root() / "work") as tmp:
        root = fetch_checkpoint(plan.source, Path(tmp), options=opts, names=mmproj_shards(plan))
        return write_mmproj_plan(plan, out, root=root)
