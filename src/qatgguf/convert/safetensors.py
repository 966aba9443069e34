"""Safetensors shards read without loading them: the header is parsed and checked
(offsets inside the file, no overlap, sizes that match dtype x shape), tensor data is
memory-mapped one tensor at a time.

ref: safetensors format (huggingface/safetensors README "Format"): u64 little-endian
header size N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}},
then the byte buffer that the offsets index.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from qatgguf.errors import CheckpointError
from qatgguf.quant._fp import max_magnitude

# dtype name -> (bytes per element, numpy view dtype). BF16 is viewed as uint16.
DTYPES: dict[str, tuple[int, str]] = {
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, "<u2"),
}
_ALL_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # ref: safetensors lib MAX_HEADER_SIZE


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    path: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]  # header order (the order the file lists them)
    metadata: dict[str, str]


def read_header(path: Path) -> ShardHeader:
    """Parse and check a shard header. Raises `CheckpointError` naming the file and tensor."""
    path = Path(path)
    file = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"file is {size} bytes, shorter than the 8-byte header length; the shard is "
                    "truncated: download it again", file=file)
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"header length {n} points past the end of the {size}-byte file; the shard is "
                    "truncated or not a safetensors file: download it again", file=file)
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError("shard file does not exist", file=file) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"header is not valid JSON ({exc}); the shard is corrupt: download it again",
                              file=file) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object; the shard is corrupt", file=file)
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("header entry lacks dtype, shape or data_offsets", file=file,
                                  tensor=name) from None
        if dtype not in DTYPES:
            known = "known" if dtype in _ALL_DTYPES else "unknown"
            raise CheckpointError(
                f"dtype {dtype} ({known}) is not supported; the converter reads F32, F16 and BF16: "
                "save the checkpoint in one of those", file=file, tensor=name)
        if begin < 0 or end < begin or end > data_size:
            raise CheckpointError(
                f"data_offsets [{begin}, {end}] point outside the {data_size}-byte data section; the "
                "shard is truncated or corrupt: download it again", file=file, tensor=name)
        expect = math.prod(shape) * DTYPES[dtype][0]
        if end - begin != expect:
            raise CheckpointError(
                f"data_offsets span {end - begin} bytes but {dtype}{list(shape)} needs {expect}; "
                "the header is corrupt", file=file, tensor=name)
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, end - begin)
    # overlap: sort by start and compare neighbours
    spans = sorted(entries.values(), key=lambda e: e.begin)
    for a, b in zip(spans, spans[1:]):
        if b.begin < a.begin + a.nbytes and b.nbytes and a.nbytes:
            raise CheckpointError(
                f"data of {b.name!r} overlaps data of {a.name!r}; the header is corrupt", file=file,
                tensor=b.name)
    return ShardHeader(file, size, data_start, entries, metadata)


def open_tensor(path: Path, entry: TensorEntry) -> np.ndarray:
    """Memory-mapped read-only view of one tensor (BF16 as raw uint16)."""
    if entry.nbytes == 0:
        return np.zeros(entry.shape, dtype=DTYPES[entry.dtype][1])
    return np.memmap(path, dtype=DTYPES[entry.dtype][1], mode="r", offset=entry.begin, shape=entry.shape)


@njit(cache=True, nogil=True)
def _bf16_widen(u: np.ndarray, out: np.ndarray) -> None:
    for i in range(u.size):
        out[i] = np.uint32(u[i]) << np.uint32(16)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """Exact widening: bf16 is the top half of an f32 (one pass, no temporaries)."""
    u = np.ascontiguousarray(u16, dtype=np.uint16)
    out = np.empty(u.shape, np.uint32)
    _bf16_widen(u.reshape(-1), out.reshape(-1))
    return out.view(np.float32)


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(raw)
    return np.asarray(raw, dtype=np.float32)


# the smallest magnitude bits with the exponent all ones (Inf; above it NaN)
_NONFINITE_FROM = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000}


def nonfinite_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Row indices (over the flattened leading dims) holding NaN or Inf.

    One vectorized pass (the largest magnitude as an integer over the bits without sign);
    rows are searched only when it finds a value with the exponent all ones."""
    rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim else raw.reshape(1, 1)
    if dtype in _NONFINITE_FROM and rows.flags.c_contiguous:
        flat = rows.reshape(-1)
        if not flat.size:
            return np.empty(0, np.int64)
        if dtype == "F32":
            top = max_magnitude(flat.view(np.uint32), np.uint32(0x7FFFFFFF))
        else:
            top = max_magnitude(flat.view(np.uint16), np.uint16(0x7FFF))
        if top < _NONFINITE_FROM[dtype]:
            return np.empty(0, np.int64)
    if dtype == "BF16":
        bad = (rows & 0x7F80) == 0x7F80  # exponent all ones: Inf or NaN
    else:
        bad = ~np.isfinite(rows)
    return np.flatnonzero(bad.any(axis=1))
