"""Shard parts: one safetensors shard in, one part file out.

A part file holds the converted tensor bytes back to back, each padded to the GGUF
alignment, then a JSON manifest (name, shape, type, offset, nbytes, sha256), then a
16-byte footer: 8 bytes magic and the manifest length (u64 little-endian)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from qatgguf import quant
from qatgguf.convert.plan import ConversionPlan, ShardJob, TensorJob
from qatgguf.convert.safetensors import DTYPES, TensorEntry, nonfinite_rows, read_header, to_f32
from qatgguf.errors import CheckpointError, NonFiniteError, QuantizationError
from qatgguf.files import atomic_output
from qatgguf.gguf.writer import pad

log = logging.getLogger(__name__)

PART_MAGIC = b"QGPART01"
CHUNK_BYTES = 64 * 1024 * 1024  # rows converted at a time; bounds memory for huge tensors


@dataclass(frozen=True)
class PartInfo:
    """What crosses the task boundary: where the part is and the digest of its manifest."""

    path: str
    sha256: str
    n_tensors: int
    nbytes: int


def _row_chunks(n_rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for a in range(0, n_rows, step):
        yield a, min(n_rows, a + step)


def _source_rows(job: TensorJob, fd: int, entry: TensorEntry,
                 file: str) -> Iterator[tuple[memoryview, np.ndarray]]:
    """The tensor's rows as stored, a block of rows at a time: (raw bytes, array view).
    Rows are read with preadv into one reused buffer, so memory stays at one block whatever
    the tensor size (a memory map would keep every touched page resident until the whole
    tensor is done). A yielded block is valid until the next one is asked for. Raises
    `NonFiniteError` for a row with NaN or Inf."""
    np_dtype = DTYPES[entry.dtype][1]
    item = DTYPES[entry.dtype][0]
    cols = entry.shape[-1] if entry.shape else 1
    n_rows = (math.prod(entry.shape) // cols) if entry.shape else 1
    if job.rows is not None:
        # embedding trimmed to the vocabulary: the first `rows` rows of a 2-D tensor
        n_rows = job.rows
    chunks = list(_row_chunks(n_rows, cols * item))
    # one buffer per tensor, refilled for each row block: the consumer has written a
    # yielded block before it asks for the next
    scratch = memoryview(bytearray(max((b - a for a, b in chunks), default=0) * cols * item))
    for ci, (a, b) in enumerate(chunks):
        want = (b - a) * cols * item
        if ci + 1 < len(chunks) and hasattr(os, "posix_fadvise"):
            # the kernel reads the next block ahead while this one is converted and written
            na, nb = chunks[ci + 1]
            os.posix_fadvise(fd, entry.begin + na * cols * item, (nb - na) * cols * item, os.POSIX_FADV_WILLNEED)
        buf = scratch[:want]
        if os.preadv(fd, [buf], entry.begin + a * cols * item) != want:
            raise CheckpointError(f"file ends inside this tensor (rows {a}..{b}); the shard is truncated: "
                                  "download it again", file=file, tensor=job.hf_name)
        block = np.frombuffer(buf, dtype=np_dtype).reshape(b - a, cols)
        bad = nonfinite_rows(block, entry.dtype)
        if bad.size:
            raise NonFiniteError(f"{file}: tensor {job.hf_name!r}: row {a + int(bad[0])} holds NaN or Inf; "
                                 "the checkpoint is corrupt or diverged: use a clean checkpoint")
        yield buf, block


def detect_type(job: TensorJob, fd: int | None, entry: TensorEntry | None, file: str) -> str:
    """The type of a `grid: auto` tensor: the first of its candidates whose grid holds the
    tensor (detected on the full tensor, as `qatgguf lattice` does), else the recipe's
    type. Any other job keeps its type."""
    if job.grid != "auto":
        return job.qtype
    if fd is None or entry is None:
        raise CheckpointError("a grid: auto tensor needs its checkpoint data", file=file, tensor=job.hf_name)
    from qatgguf.quant.lattice import detect_grid_rows

    def rows() -> Iterator[np.ndarray]:
        for _, block in _source_rows(job, fd, entry, file):
            yield to_f32(block, entry.dtype)

    found = detect_grid_rows(rows, n=int(job.shape[-1]), candidates=job.candidates)
    return found.qtype or job.qtype


def _tensor_chunks(job: TensorJob, fd: int | None, entry: TensorEntry | None,
                   file: str, threads: int = 1) -> Iterator[bytes | memoryview]:
    """Output bytes of one tensor (its type decided: not grid "auto"), a block of rows at a
    time. A yielded block is valid until the next one is asked for."""
    if job.transform == "rope_freqs":
        # ref: conversion/gemma.py Gemma4Model.generate_extra_tensors
        p = job.params
        v = np.array([1.0] * p["n_rot"] + [1e30] * p["n_unrot"], dtype=np.float32)
        yield quant.quantize(v, job.qtype).tobytes() if job.qtype != "F32" else v.tobytes()
        return
    assert fd is not None and entry is not None and job.grid != "auto"
    same = job.src_dtype == job.qtype and job.transform == "copy"
    for buf, block in _source_rows(job, fd, entry, file):
        if same:
            # BF16/F16/F32 kept as they are: llama.cpp's round trip through F32 gives back
            # the same bytes (no NaN: checked above)
            yield buf
            continue
        if entry.dtype == "BF16" and job.transform == "copy" and job.qtype not in ("F32", "F16"):
            # bf16 rows go to the quantizer as they are: its threads widen them to float32
            # chunk by chunk, where a widened copy of the whole block would be one more
            # pass over memory on this thread while they wait
            yield np.ascontiguousarray(_quantize(job, block, file, threads, bits="bf16")).tobytes()
            continue
        x = to_f32(block, entry.dtype)
        if job.transform == "norm_shift":
            x = x + np.float32(job.params["shift"])  # ref: conversion/gemma.py Gemma3Model.norm_shift
        if job.qtype == "F32":
            yield np.ascontiguousarray(x, dtype=np.float32).tobytes()
        elif job.qtype == "F16":
            yield x.astype(np.float16).tobytes()
        else:
            yield np.ascontiguousarray(_quantize(job, x, file, threads)).tobytes()


def _quantize(job: TensorJob, x: np.ndarray, file: str, threads: int, bits: str | None = None) -> np.ndarray:
    try:
        return quant.quantize(x, job.qtype, grid=job.grid, threads=threads, bits=bits, name=job.gguf_name)
    except QuantizationError as exc:
        raise type(exc)(f"{file}: tensor {job.hf_name!r} -> {job.gguf_name}: {exc}") from None


def shard_path(plan: ConversionPlan, sj: ShardJob, given: Path | None) -> Path | None:
    """The local file a shard job reads: `given` (fetched by the caller), else the file in
    a local checkpoint folder. Raises `CheckpointError` when a remote shard was not fetched."""
    if sj.file is None:
        return None
    if given is not None:
        return Path(given)
    if plan.source.local_dir is None:
        raise CheckpointError("the shard is remote: fetch it first (SourceReader.fetch) and pass its path",
                              file=plan.source.label(sj.file))
    return plan.source.local_dir / sj.file


def convert_shard(plan: ConversionPlan, index: int, out_part: Path, *, shard: Path | None = None,
                  threads: int | None = None) -> PartInfo:
    """Convert shard job `index` of `plan` into the part file `out_part`, quantizing on
    `threads` threads (default: `quant.default_threads()`). `shard` is the local copy of
    the job's safetensors file (fetched and checked by the caller); for a local checkpoint
    it defaults to the file in the checkpoint folder. A `grid: auto` tensor gets the type
    detection chooses on it; the manifest records every tensor's type and size.

    Reads only that shard, one block of rows at a time. Raises `CheckpointError`
    if the shard changed since planning, `NonFiniteError` for NaN/Inf, `QuantizationError`
    when a tensor cannot be quantized as the recipe asks."""
    if not 0 <= index < len(plan.shards):
        raise IndexError(f"shard index {index} outside 0..{len(plan.shards) - 1}")
    sj = plan.shards[index]
    threads = threads or quant.default_threads()
    out_part = Path(out_part)
    out_part.parent.mkdir(parents=True, exist_ok=True)
    src_path = shard_path(plan, sj, shard)
    entries: dict[str, TensorEntry] = {}
    if src_path is not None:
        header = read_header(src_path)
        if header.file_size != sj.size:
            raise CheckpointError(f"file is {header.file_size} bytes, the plan saw {sj.size}; the "
                                  "shard changed after planning: plan again", file=str(src_path))
        entries = header.tensors
    manifest = []
    fd = os.open(src_path, os.O_RDONLY) if src_path is not None else None
    try:
        with atomic_output(out_part) as tmp, open(tmp, "wb") as fh:
            for job in sj.tensors:
                e = None
                if job.hf_name is not None:
                    e = entries.get(job.hf_name)
                    if e is None or e.shape != job.src_shape or e.dtype != job.src_dtype:
                        raise CheckpointError("tensor missing or changed since planning: plan again",
                                              file=str(src_path), tensor=job.hf_name)
                job = job.resolved(detect_type(job, fd, e, str(src_path)))
                offset = fh.tell()
                h = hashlib.sha256()
                n = 0
                t0 = time.monotonic()
                for chunk in _tensor_chunks(job, fd, e, str(src_path), threads):
                    h.update(chunk)
                    fh.write(chunk)
                    n += len(chunk)
                if n != job.nbytes:
                    raise QuantizationError(f"tensor {job.gguf_name}: produced {n} bytes, the plan "
                                            f"expects {job.nbytes} for {job.qtype}{list(job.shape)}")
                fh.write(b"\0" * (pad(n) - n))
                log.info("%s -> %s %s%s %s: %d bytes in %.3f s", job.hf_name or "(generated)", job.gguf_name,
                         job.qtype, f" (grid {job.grid})" if job.grid else "", list(job.shape), n,
                         time.monotonic() - t0)
                manifest.append({"name": job.gguf_name, "shape": list(job.shape), "type": job.qtype,
                                 "offset": offset, "nbytes": n, "sha256": h.hexdigest()})
            body = json.dumps({"version": 1, "shard": index, "tensors": manifest}).encode()
            fh.write(body)
            fh.write(PART_MAGIC + struct.pack("<Q", len(body)))
    finally:
        if fd is not None:
            os.close(fd)
    # the manifest lists every tensor's sha256, so its digest identifies the part's content
    return PartInfo(path=str(out_part), sha256=hashlib.sha256(body).hexdigest(), n_tensors=len(manifest),
                    nbytes=sum(m["nbytes"] for m in manifest))


def read_manifest(part: Path) -> dict:
    """The manifest of a part file. Raises `CheckpointError` if the file is not a part."""
    part = Path(part)
    with open(part, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size < 16:
            raise CheckpointError("not a part file (too short)", file=str(part))
        fh.seek(size - 16)
        magic, (n,) = fh.read(8), struct.unpack("<Q", fh.read(8))
        if magic != PART_MAGIC or n > size - 16:
            raise CheckpointError("not a part file (bad footer); convert the shard again", file=str(part))
        fh.seek(size - 16 - n)
        return json.loads(fh.read(n))


def write_direct(plan: ConversionPlan, out: Path, *, root: Path | None = None, split_max_size: int | None = None,
                 threads: int | None = None) -> list[Path]:
    """Convert every shard job straight into the GGUF file(s), in plan order (shard by shard,
    one tensor block at a time): the single-process path, with no part files. `root` holds
    the shard files (default: the local checkpoint folder). `grid: auto` tensors are
    detected first (the header needs their types), as `convert_shard` detects them, so the
    file equals the assembled parts byte for byte. Written under temporary names and
    renamed when complete. Quantizes on `threads` threads (default:
    `quant.default_threads()`)."""
    threads = threads or quant.default_threads()
    root = Path(root) if root is not None else plan.source.local_dir
    if root is None:
        raise CheckpointError("the checkpoint is remote: fetch it first (fetch_checkpoint) and pass root",
                              file=plan.source.label())
    from qatgguf.gguf.writer import GGUFFileWriter, shard_paths, split_kvs, split_tensors

    jobs = {t.gguf_name: (sj, t) for sj in plan.shards for t in sj.tensors}
    fds: dict[str, int] = {}
    writers: list[GGUFFileWriter] = []
    handles = []
    try:
        for sj in plan.shards:  # checked once per shard, as convert_shard does
            if sj.file is not None:
                header = read_header(root / sj.file)
                if header.file_size != sj.size:
                    raise CheckpointError(f"file is {header.file_size} bytes, the plan saw {sj.size}; the "
                                          "shard changed after planning: plan again", file=header.path)
                fds[sj.file] = os.open(header.path, os.O_RDONLY)
                jobs.update({t.gguf_name: (sj, t, header.tensors.get(t.hf_name)) for t in sj.tensors})

        def source(name: str) -> tuple[TensorJob, int | None, TensorEntry | None, str]:
            sj, job, *entry = jobs[name]
            e = entry[0] if entry else None
            if job.hf_name is not None and (e is None or e.shape != job.src_shape or e.dtype != job.src_dtype):
                raise CheckpointError("tensor missing or changed since planning: plan again",
                                      file=str(root / sj.file), tensor=job.hf_name)
            fd = fds.get(sj.file) if sj.file else None
            return job, fd, e, str(root / sj.file) if sj.file else "<generated>"

        types = {n: detect_type(*source(n)) for n in plan.auto_tensors}
        infos = plan.tensor_infos(types)
        groups = split_tensors(infos, split_max_size)
        paths = shard_paths(out, len(groups))
        # every file under a temporary name until all are complete
        with contextlib.ExitStack() as outputs:
            tmps = [outputs.enter_context(atomic_output(p)) for p in paths]
            file_of = {ti.name: gi for gi, g in enumerate(groups) for ti in g}
            for i, (g, tmp) in enumerate(zip(groups, tmps)):
                if len(groups) == 1:
                    kvs = list(plan.kvs)
                else:
                    kvs = (list(plan.kvs) if i == 0 else []) + split_kvs(i, len(groups), len(infos))
                fh = open(tmp, "wb")
                handles.append(fh)
                w = GGUFFileWriter(fh, kvs, g)
                w.write_header()
                writers.append(w)
            for name in plan.order:
                job, fd, e, file = source(name)
                job = job.resolved(types.get(name, job.qtype))
                w = writers[file_of[name]]
                w.begin_tensor(name)
                for chunk in _tensor_chunks(job, fd, e, file, threads):
                    w.write(chunk)
            for w in writers:
                w.finish()
            for fh in handles:
                fh.close()
    finally:
        for fh in handles:
            fh.close()
        for fd in fds.values():
            os.close(fd)
    return paths
