"""The conversion plan: every tensor's source, GGUF name, type and size, the GGUF
metadata, and one shard job per safetensors file. Built from config.json, the tokenizer
files and the shard headers only (no tensor data), so it is cheap, and it is plain data
that crosses task boundaries as JSON."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from gguf import GGMLQuantizationType, LlamaFileType

from qatgguf.convert.arch import ArchSpec, arch_for, is_kv_shared_redundant, is_multimodal, map_name
from qatgguf.convert.metadata import TextGeometry, build_metadata, text_geometry, vocab_rows
from qatgguf.convert.safetensors import ShardHeader
from qatgguf.convert.source import (
    SourceOptions, SourceReader, SourceRef, open_reader, read_shard_header, snapshot)
from qatgguf.errors import CheckpointError, UnknownTensorError
from qatgguf.gguf.writer import KV, TensorInfo, tensor_nbytes
from qatgguf.recipes import Recipe, load_recipe

log = logging.getLogger(__name__)

PLAN_VERSION = 2
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME_RE = re.compile(r"^[\w][\w.-]*\.safetensors$")


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor. Shapes are numpy (row-major) order.

    With `grid == "auto"` the type is decided by detection in the shard task, on the full
    tensor: one of `candidates` (written on its grid) or, on no grid, `qtype`; `nbytes` is
    then the size in `qtype`, and the part manifest records the type and size chosen."""

    gguf_name: str
    hf_name: str | None  # None: generated (rope_freqs)
    src_dtype: str | None
    src_shape: tuple[int, ...]
    shape: tuple[int, ...]
    qtype: str
    grid: str | None
    nbytes: int
    transform: str = "copy"  # "copy" | "norm_shift" | "rope_freqs"
    rows: int | None = None  # keep only the first `rows` rows (embedding trimmed to the vocab)
    params: dict[str, Any] = field(default_factory=dict)
    candidates: tuple[str, ...] = ()  # grid types detection may choose (grid "auto")

    @property
    def allowed(self) -> tuple[str, ...]:
        """Every type this tensor may be written in."""
        return (*self.candidates, self.qtype) if self.grid == "auto" else (self.qtype,)

    def resolved(self, qtype: str) -> TensorJob:
        """This job with its type decided: a candidate is written on its grid, the fallback
        type as the recipe chose it.

        Raises ValueError for a type the plan does not allow."""
        if qtype not in self.allowed:
            raise ValueError(f"tensor {self.gguf_name}: type {qtype} is not one the plan allows "
                             f"({', '.join(self.allowed)}); plan again")
        if self.grid != "auto":
            return self
        grid = "qat" if qtype in self.candidates else None
        return replace(self, qtype=qtype, grid=grid, candidates=(),
                       nbytes=tensor_nbytes(self.shape, GGMLQuantizationType[qtype]))


@dataclass(frozen=True)
class ShardJob:
    index: int
    file: str | None  # shard file name inside the checkpoint; None for the generated tensors
    size: int
    tensors: tuple[TensorJob, ...]
    digest: str = ""  # the shard's content digest at the planned revision (SourceFile.digest)


@dataclass(frozen=True)
class MmprojTensor:
    hf_name: str
    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ConversionPlan:
    version: int
    source: SourceRef  # the checkpoint at its planned revision; tasks fetch shards from it
    hf_architecture: str
    arch: str
    recipe: str
    file_type: int
    kvs: tuple[KV, ...]
    order: tuple[str, ...]  # GGUF tensor names in file order
    shards: tuple[ShardJob, ...]
    mmproj: tuple[MmprojTensor, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (hf name, why)

    @property
    def tensors(self) -> dict[str, TensorJob]:
        return {t.gguf_name: t for s in self.shards for t in s.tensors}

    @property
    def auto_tensors(self) -> list[str]:
        """Names of the tensors whose type detection decides (grid "auto"), in file order."""
        jobs = self.tensors
        return [n for n in self.order if jobs[n].grid == "auto"]

    def tensor_infos(self, types: dict[str, str] | None = None) -> list[TensorInfo]:
        """The GGUF tensor table. `types` gives the type detection chose for each "auto"
        tensor (from the part manifests); it is required when the plan has such tensors.

        Raises ValueError for a missing or disallowed type."""
        jobs = self.tensors
        out = []
        for n in self.order:
            job = jobs[n]
            if job.grid == "auto":
                if types is None or n not in types:
                    raise ValueError(f"tensor {n}: its type is decided by grid detection in the shard "
                                     "task; pass the types the parts recorded")
                job = job.resolved(types[n])
            out.append(TensorInfo(n, job.shape, int(GGMLQuantizationType[job.qtype]), job.nbytes))
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d["kvs"] = [kv.to_json() for kv in self.kvs]
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ConversionPlan:
        d = json.loads(text)
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not {PLAN_VERSION}; plan again")
        shards = tuple(
            ShardJob(index=s["index"], file=s["file"], size=s["size"], digest=s["digest"],
                     tensors=tuple(TensorJob(**{**t, "src_shape": tuple(t["src_shape"]),
                                                "shape": tuple(t["shape"]),
                                                "candidates": tuple(t.get("candidates", ()))})
                                   for t in s["tensors"]))
            for s in d["shards"])
        return cls(version=d["version"], source=SourceRef.from_dict(d["source"]),
                   hf_architecture=d["hf_architecture"],
                   arch=d["arch"], recipe=d["recipe"], file_type=d["file_type"],
                   kvs=tuple(KV.from_json(k) for k in d["kvs"]), order=tuple(d["order"]),
                   shards=shards,
                   mmproj=tuple(MmprojTensor(**{**m, "shape": tuple(m["shape"])}) for m in d["mmproj"]),
                   skipped=tuple(tuple(x) for x in d["skipped"]))


def shard_files(ref: SourceRef, meta: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard files of a checkpoint (from its index when there is one) and the index's
    weight map. The index is untrusted input: every file it names must be a bare
    `*.safetensors` name inside the checkpoint."""
    index = meta / INDEX_NAME
    label = ref.label(INDEX_NAME)
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read weight_map ({exc}); the index is corrupt",
                                  file=label) from None
        for tensor, f in wm.items():
            if not _SHARD_NAME_RE.match(f) or f in (".", ".."):
                raise CheckpointError(
                    f"weight_map names file {f!r}, which is not a bare *.safetensors file name inside the "
                    "checkpoint (no folders, no '..', no absolute paths); the index is corrupt or crafted: "
                    "fix or download it again", file=label, tensor=tensor)
        files = sorted(set(wm.values()))
        for f in files:
            if not ref.has(f):
                names = sorted(n for n, v in wm.items() if v == f)
                raise CheckpointError(
                    f"index names shard {f!r}, which does not exist (it should hold {len(names)} "
                    f"tensors, e.g. {names[0]!r}); download the missing shard",
                    file=label, tensor=names[0])
        return files, wm
    single = ref.shard_names()
    if single:
        return single, None
    local = ref.local_dir
    pickles = (sorted(p.name for p in local.glob("*.bin")) + sorted(p.name for p in local.glob("*.pt*"))
               if local is not None else [])
    if pickles:
        raise CheckpointError(
            f"only pickle weights found ({', '.join(pickles[:3])}); pickle files can run code when "
            "loaded, so they are refused: convert the checkpoint to safetensors first "
            "(save_pretrained(..., safe_serialization=True))", file=ref.label(pickles[0]))
    raise CheckpointError("no safetensors shards and no model.safetensors.index.json",
                          file=ref.label())


def load_hparams(src: Path) -> tuple[dict[str, Any], Any]:
    """(config dict as llama.cpp's converter sees it, text config object).

    ref: conversion/base.py ModelBase.load_hparams (AutoConfig(...).to_dict()) and
    TextModel.__init__ (text_config merged into the top level)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"transformers cannot read config.json: {exc}",
                              file=str(src / "config.json")) from None
    d = cfg.to_dict()
    if "text_config" in d:
        d = {**d, **d["text_config"]}
    return d, cfg.get_text_config()


def _check_shape(file: str, hf_name: str, got: tuple[int, ...], want: tuple[int, ...] | None,
                 rule: str, g: TextGeometry) -> None:
    if want is None:  # token_embd: rows are the vocab (checked below), cols the hidden size
        if len(got) != 2 or got[1] != g.hidden or got[0] < g.vocab:
            raise CheckpointError(
                f"shape {list(got)} disagrees with config.json (vocab_size {g.vocab}, hidden_size "
                f"{g.hidden}); the config does not belong to these weights", file=file, tensor=hf_name)
        return
    if got != want:
        raise CheckpointError(
            f"shape {list(got)} disagrees with config.json, which implies {list(want)} ({rule}); "
            "the config does not belong to these weights: fix config.json", file=file, tensor=hf_name)


def plan_conversion(src: Path | str | SourceRef, *, recipe: Recipe | str,
                    source_options: dict[str, Any] | SourceOptions | None = None,
                    hash_local: bool = True) -> ConversionPlan:
    """Plan the conversion of a checkpoint: a local directory, `hf://org/repo@rev`,
    `s3://bucket/prefix` or an already resolved `SourceRef`. Reads config.json, the
    tokenizer files and every shard's header (ranged reads for remote sources: no tensor
    data is downloaded). Raises `CheckpointError` (and subclasses) naming the file and
    tensor for bad input, `ConfigError` for a bad recipe. `source_options` are
    `SourceOptions` or the dict keywords hf_endpoint, hf_token, endpoint_url,
    credentials, region. `hash_local=False` skips hashing a local checkpoint's files (the
    plan then records no digests: fine for a one-process conversion)."""
    opts = source_options if isinstance(source_options, SourceOptions) else SourceOptions.from_dict(source_options)
    ref = snapshot(src, options=opts, hash_local=hash_local)
    return plan_recipes(ref, [recipe], reader=open_reader(ref, opts))[_recipe_name(recipe)]


def _recipe_name(recipe: Recipe | str) -> str:
    return recipe if isinstance(recipe, str) else recipe.name


def plan_recipes(ref: SourceRef, recipes: Sequence[Recipe | str], *,
                 reader: SourceReader | None = None) -> dict[str, ConversionPlan]:
    """Plan several recipes of one snapshot, reading its small files and headers once."""
    reader = reader if reader is not None and reader.ref == ref else open_reader(ref)
    with reader.small_files() as meta:
        try:
            return {_recipe_name(r): _plan(ref, reader, meta, r) for r in recipes}
        except CheckpointError as exc:
            # name the source's file, not the temporary folder the small files sit in
            if exc.file and exc.file.startswith(str(meta)) and ref.local_dir is None:
                raise type(exc)(exc.message, file=ref.label(exc.file[len(str(meta)) + 1:]),
                                tensor=exc.tensor) from None
            raise


def _plan(ref: SourceRef, reader, src: Path, recipe: Recipe | str) -> ConversionPlan:
    if not (src / "config.json").is_file():
        raise CheckpointError("config.json is missing; a checkpoint directory needs it",
                              file=ref.label("config.json"))
    raw_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    spec: ArchSpec = arch_for(raw_cfg, file=str(src / "config.json"))
    hf_arch = next(a for a in raw_cfg["architectures"] if a in spec.hf_architectures)
    rec = load_recipe(recipe) if isinstance(recipe, str) else recipe
    files, weight_map = shard_files(ref, src)
    hparams, tc = load_hparams(src)
    geo = text_geometry(tc, hparams, spec.family)
    first_shared = geo.n_layer - geo.n_kv_shared
    keep_rows = vocab_rows(src, hparams)

    headers: list[ShardHeader] = [read_shard_header(reader, f) for f in files]
    if weight_map is not None:
        index_file = ref.label(INDEX_NAME)
        for f, h in zip(files, headers):
            for n in (n for n, v in weight_map.items() if v == f):
                if n not in h.tensors:
                    raise CheckpointError(
                        f"index places this tensor in {f!r}, but that shard does not hold it; "
                        "the shard is incomplete or the index stale: download both again",
                        file=index_file, tensor=n)
            for n in h.tensors:
                if weight_map.get(n) != f:
                    raise CheckpointError(
                        f"shard holds a tensor the index does not place there ({weight_map.get(n)!r}); "
                        "the index is stale: download it again", file=h.path, tensor=n)

    from qatgguf.convert.arch import Geometry

    shape_geo = Geometry(vocab=geo.vocab, hidden=geo.hidden, n_layer=geo.n_layer, n_head=geo.n_head,
                         head_dim=geo.head_dim, n_kv=geo.n_kv, n_ff=geo.n_ff, ple_dim=geo.ple_dim,
                         ple_vocab=geo.ple_vocab, n_expert=geo.n_expert, expert_ff=geo.expert_ff)
    shard_jobs: list[ShardJob] = []
    mm: list[MmprojTensor] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    pending: list[tuple[int, str, Any, Any]] = []  # (shard idx, hf name, entry, mapped)
    for i, (f, h) in enumerate(zip(files, headers)):
        for name, entry in h.tensors.items():
            if is_multimodal(name):
                mm.append(MmprojTensor(name, f, entry.dtype, entry.shape))
                continue
            if name in ("lm_head.weight", "model.lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
                skipped.append((name, "tied to token_embd / recomputed by llama.cpp"))
                continue
            m = map_name(name)
            if m is None:
                raise UnknownTensorError(
                    f"no GGUF name for this tensor in architecture {hf_arch}; it is not part of a "
                    "known Gemma layout: remove it or report the layout", file=h.path, tensor=name)
            if is_kv_shared_redundant(m.gguf_name, m.layer, first_shared):
                skipped.append((name, f"layer {m.layer} reuses K/V of an earlier layer (KV-shared)"))
                continue
            if m.layer is not None and m.layer >= geo.n_layer:
                raise CheckpointError(f"layer {m.layer} but config.json has num_hidden_layers "
                                      f"{geo.n_layer}", file=h.path, tensor=name)
            if m.gguf_name in seen:
                raise CheckpointError(f"maps to {m.gguf_name!r} like {seen[m.gguf_name]!r}; "
                                      "duplicate tensor", file=h.path, tensor=name)
            seen[m.gguf_name] = name
            _check_shape(h.path, name, entry.shape, shape_geo.expected(m.shape_rule, m.layer),
                         m.shape_rule, geo)
            pending.append((i, name, entry, m))

    # generated: rope_freqs for the proportional rope of full layers (gemma4)
    # ref: conversion/gemma.py Gemma4Model.generate_extra_tensors
    gen_jobs: list[tuple[str, tuple[int, ...], dict[str, Any]]] = []
    if spec.family == "gemma4":
        full = [i for i, t in enumerate(geo.layer_types) if t == "full_attention"]
        hd_full = geo.head_dim[full[0]] if full else geo.head_dim[0]
        rp = (hparams.get("rope_parameters") or {}).get("full_attention", {})
        if rp.get("rope_type", "proportional") != "proportional":
            raise CheckpointError(f"full-attention rope_type {rp.get('rope_type')!r} is not "
                                  "'proportional'", file=ref.label("config.json"))
        n_rot = int(hd_full * rp.get("partial_rotary_factor", 0.25) / 2)
        gen_jobs.append(("rope_freqs.weight", (hd_full // 2,), {"n_rot": n_rot, "n_unrot": hd_full // 2 - n_rot}))

    def out_shape(name: str, entry: Any, m: Any) -> tuple[tuple[int, ...], int | None]:
        if m.gguf_name == "token_embd.weight" and keep_rows is not None and entry.shape[0] > keep_rows:
            return (keep_rows, *entry.shape[1:]), keep_rows
        return tuple(entry.shape), None

    all_shapes = [(g, s) for g, s, _ in gen_jobs] + [(m.gguf_name, out_shape(n, e, m)[0]) for _, n, e, m in pending]
    # what recipe rules may test (`when:`), as llama-quantize reads it from the GGUF hparams
    facts = {"n_expert": geo.n_expert}
    rec.check_coverage(all_shapes, facts=facts)

    def job(gname: str, hf: str | None, dtype: str | None, src_shape: tuple[int, ...],
            shape: tuple[int, ...], rows: int | None, transform: str, params: dict[str, Any]) -> TensorJob:
        ch = rec.choose(gname, shape, facts=facts)
        return TensorJob(gguf_name=gname, hf_name=hf, src_dtype=dtype, src_shape=src_shape, shape=shape,
                         qtype=ch.qtype, grid=ch.grid, nbytes=tensor_nbytes(shape, GGMLQuantizationType[ch.qtype]),
                         transform=transform, rows=rows, params=params, candidates=ch.candidates)

    for i, (f, h) in enumerate(zip(files, headers)):
        jobs = []
        for si, name, entry, m in pending:
            if si != i:
                continue
            shape, rows = out_shape(name, entry, m)
            shift = spec.norm_shift and m.gguf_name.endswith("norm.weight")
            jobs.append(job(m.gguf_name, name, entry.dtype, tuple(entry.shape), shape, rows,
                            "norm_shift" if shift else "copy", {"shift": spec.norm_shift} if shift else {}))
        shard_jobs.append(ShardJob(index=i, file=f, size=h.file_size, tensors=tuple(jobs),
                                   digest=ref.file(f).digest))
    if gen_jobs:
        shard_jobs.append(ShardJob(index=len(shard_jobs), file=None, size=0, tensors=tuple(
            job(g, None, None, s, s, None, "rope_freqs", p) for g, s, p in gen_jobs)))

    # order as llama.cpp writes: generated tensors first, then shards in order
    gen = [t.gguf_name for s in shard_jobs if s.file is None for t in s.tensors]
    rest = [t.gguf_name for s in shard_jobs if s.file is not None for t in s.tensors]
    order = tuple(gen + rest)
    by_name = {t.gguf_name: t for s in shard_jobs for t in s.tensors}
    file_type = int(LlamaFileType[rec.file_type])
    kvs = build_metadata(src=src, spec=spec, hparams=hparams, geometry=geo, file_type=file_type,
                         tensors=[(n, by_name[n].shape) for n in order],
                         unified="Unified" in hf_arch)
    return ConversionPlan(version=PLAN_VERSION, source=ref, hf_architecture=hf_arch, arch=spec.gguf_arch,
                          recipe=rec.name, file_type=file_type, kvs=tuple(kvs), order=order,
                          shards=tuple(shard_jobs), mmproj=tuple(mm), skipped=tuple(skipped))
