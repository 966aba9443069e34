"""Shard parts: one safetensors shard in, one part file out.

A part file holds the converted tensor bytes back to back, each padded to the GGUF
alignment, then a JSON manifest (name, shape, type, offset, nbytes, sha256), then a
16-byte footer: 8 bytes magic and the manifest length (u64 little-endian)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from qatgguf import quant
from qatgguf.convert.plan import ConversionPlan, TensorJob
from qatgguf.convert.safetensors import DTYPES, TensorEntry, nonfinite_rows, read_header, to_f32
from qatgguf.errors import CheckpointError, NonFiniteError, QuantizationError
from qatgguf.gguf.writer import pad

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


def _tensor_chunks(job: TensorJob, fd: int | None, entry: TensorEntry | None,
                   file: str, threads: int = 1) -> Iterator[bytes | memoryview]:
    """Output bytes of one tensor, a block of rows at a time. Rows are read with preadv into
    one reused buffer, so memory stays at one block whatever the tensor size (a memory map
    would keep every touched page resident until the whole tensor is done). A yielded
    block is valid until the next one is asked for."""
    if job.transform == "rope_freqs":
        # ref: conversion/gemma.py Gemma4Model.generate_extra_tensors
        p = job.params
        v = np.array([1.0] * p["n_rot"] + [1e30] * p["n_unrot"], dtype=np.float32)
        yield quant.quantize(v, job.qtype).tobytes() if job.qtype != "F32" else v.tobytes()
        return
    assert fd is not None and entry is not None
    np_dtype = DTYPES[entry.dtype][1]
    item = DTYPES[entry.dtype][0]
    cols = entry.shape[-1] if entry.shape else 1
    n_rows = (math.prod(entry.shape) // cols) if entry.shape else 1
    if job.rows is not None:
        # embedding trimmed to the vocabulary: the first `rows` rows of a 2-D tensor
        n_rows = job.rows
    same = job.src_dtype == job.qtype and job.transform == "copy"
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
        return quant.quantize(x, job.qtype, grid=job.grid, threads=threads, bits=bits)
    except QuantizationError as exc:
        raise type(exc)(f"{file}: tensor {job.hf_name!r} -> {job.gguf_name}: {exc}") from None


def convert_shard(plan: ConversionPlan, index: int, out_part: Path, *, threads: int | None = None) -> PartInfo:
    """Convert shard job `index` of `plan` into the part file `out_part`, quantizing on
    `threads` threads (default: `quant.default_threads()`).

    Reads only that shard, one block of rows at a time. Raises `CheckpointError`
    if the shard changed since planning, `NonFiniteError` for NaN/Inf, `QuantizationError`
    when a tensor cannot be quantized as the recipe asks."""
    if not 0 <= index < len(plan.shards):
        raise IndexError(f"shard index {index} outside 0..{len(plan.shards) - 1}")
    sj = plan.shards[index]
    threads = threads or quant.default_threads()
    out_part = Path(out_part)
    out_part.parent.mkdir(parents=True, exist_ok=True)
    src_path = Path(plan.src) / sj.file if sj.file else None
    entries: dict[str, TensorEntry] = {}
    if src_path is not None:
        header = read_header(src_path)
        if header.file_size != sj.size:
            raise CheckpointError(f"file is {header.file_size} bytes, the plan saw {sj.size}; the "
                                  "shard changed after planning: plan again", file=str(src_path))
        entries = header.tensors
    tmp = out_part.with_name(out_part.name + f".tmp{os.getpid()}")
    manifest = []
    fd = os.open(src_path, os.O_RDONLY) if src_path is not None else None
    try:
        with open(tmp, "wb") as fh:
            for job in sj.tensors:
                e = None
                if job.hf_name is not None:
                    e = entries.get(job.hf_name)
                    if e is None or e.shape != job.src_shape or e.dtype != job.src_dtype:
                        raise CheckpointError("tensor missing or changed since planning: plan again",
                                              file=str(src_path), tensor=job.hf_name)
                offset = fh.tell()
                h = hashlib.sha256()
                n = 0
                for chunk in _tensor_chunks(job, fd, e, str(src_path), threads):
                    h.update(chunk)
                    fh.write(chunk)
                    n += len(chunk)
                if n != job.nbytes:
                    raise QuantizationError(f"tensor {job.gguf_name}: produced {n} bytes, the plan "
                                            f"expects {job.nbytes} for {job.qtype}{list(job.shape)}")
                fh.write(b"\0" * (pad(n) - n))
                manifest.append({"name": job.gguf_name, "shape": list(job.shape), "type": job.qtype,
                                 "offset": offset, "nbytes": n, "sha256": h.hexdigest()})
            body = json.dumps({"version": 1, "shard": index, "tensors": manifest}).encode()
            fh.write(body)
            fh.write(PART_MAGIC + struct.pack("<Q", len(body)))
        os.replace(tmp, out_part)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


def write_direct(plan: ConversionPlan, out: Path, *, split_max_size: int | None = None,
                 threads: int | None = None) -> list[Path]:
    """Convert every shard job straight into the GGUF file(s), in plan order (shard by shard,
    one tensor block at a time): the single-process path, with no part files. Written under
    temporary names and renamed when complete. Quantizes on `threads` threads (default:
    `quant.default_threads()`)."""
    threads = threads or quant.default_threads()
    from qatgguf.gguf.writer import GGUFFileWriter, shard_paths, split_kvs, split_tensors

    infos = plan.tensor_infos()
    groups = split_tensors(infos, split_max_size)
    paths = shard_paths(out, len(groups))
    tmps = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in paths]
    file_of = {ti.name: gi for gi, g in enumerate(groups) for ti in g}
    jobs = {t.gguf_name: (sj, t) for sj in plan.shards for t in sj.tensors}
    fds: dict[str, int] = {}
    writers: list[GGUFFileWriter] = []
    handles = []
    try:
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
        for sj in plan.shards:  # checked once per shard, as convert_shard does
            if sj.file is not None:
                header = read_header(Path(plan.src) / sj.file)
                if header.file_size != sj.size:
                    raise CheckpointError(f"file is {header.file_size} bytes, the plan saw {sj.size}; the "
                                          "shard changed after planning: plan again", file=header.path)
                fds[sj.file] = os.open(header.path, os.O_RDONLY)
                jobs.update({t.gguf_name: (sj, t, header.tensors.get(t.hf_name)) for t in sj.tensors})
        for name in plan.order:
            sj, job, *entry = jobs[name]
            e = entry[0] if entry else None
            if job.hf_name is not None and (e is None or e.shape != job.src_shape or e.dtype != job.src_dtype):
                raise CheckpointError("tensor missing or changed since planning: plan again",
                                      file=str(Path(plan.src) / sj.file), tensor=job.hf_name)
            w = writers[file_of[name]]
            w.begin_tensor(name)
            fd = fds.get(sj.file) if sj.file else None
            file = str(Path(plan.src) / sj.file) if sj.file else "<generated>"
            for chunk in _tensor_chunks(job, fd, e, file, threads):
                w.write(chunk)
        for w in writers:
            w.finish()
        for fh in handles:
            fh.close()
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
    except BaseException:
        for fh in handles:
            fh.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    return paths
