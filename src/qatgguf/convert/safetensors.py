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
    """Parse and check the header of a local shard. Raises `CheckpointError` naming the
    file and tensor."""
    path = Path(path)
    file = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = header_length(fh.read(8), file_size=size, file=file)
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError("shard file does not exist", file=file) from None
    return parse_header(raw, file_size=size, file=file)


def header_length(first8: bytes, *, file_size: int, file: str) -> int:
    """The JSON header's length from a shard's first 8 bytes, checked against the file size."""
    if len(first8) < 8:
        raise CheckpointError(
            f"file is {file_size} bytes, shorter than the 8-byte header length; the shard is "
            "truncated: download it again", file=file)
    (n,) = struct.unpack("<Q", first8[:8])
    if n > _MAX_HEADER or 8 + n > file_size:
        raise CheckpointError(
            f"header length {n} points past the end of the {file_size}-byte file (or above "
            f"{_MAX_HEADER} bytes); the shard is truncated or not a safetensors file: download it again",
            file=file)
    return n


def _nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting outside strings: a header is at most 3 levels deep
    ({name: {shape: [..]}}), so anything deeper is refused before json parses it."""
    depth = top = 0
    in_str = esc = False
    for c in raw:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x7B, 0x5B):
            depth += 1
            top = max(top, depth)
        elif c in (0x7D, 0x5D):
            depth -= 1
    return top


def _dims(value: object) -> tuple[int, ...] | None:
    # JSON integers only: no floats, strings, booleans or negative sizes
    if not isinstance(value, list):
        return None
    if not all(type(d) is int and d >= 0 for d in value):
        return None
    return tuple(value)


def parse_header(raw: bytes, *, file_size: int, file: str) -> ShardHeader:
    """Check a shard's JSON header (the bytes after the 8-byte length) against the rules of
    the format; the shard is untrusted input. Raises `CheckpointError` naming the file and
    the tensor, the rule broken and the fix.

    ref: safetensors format (huggingface/safetensors README "Format"): every entry is
    {dtype, shape: [non-negative ints], data_offsets: [begin, end]} with the offsets inside
    the data section and no two tensors sharing bytes; `__metadata__` maps str to str."""
    n = len(raw)
    if _nesting_depth(raw) > 3:
        raise CheckpointError("header nests deeper than a safetensors header can (3 levels); the "
                              "shard is corrupt or crafted: download it again", file=file)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"header is not valid JSON ({exc}); the shard is corrupt: download it again",
                              file=file) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object; the shard is corrupt", file=file)
    data_start = 8 + n
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("__metadata__ must map strings to strings; the header is corrupt",
                              file=file, tensor="__metadata__")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            raise CheckpointError("header entry must be {dtype, shape, data_offsets}; the header is corrupt",
                                  file=file, tensor=name)
        dtype = info.get("dtype")
        shape = _dims(info.get("shape"))
        offsets = _dims(info.get("data_offsets"))
        if not isinstance(dtype, str) or shape is None:
            raise CheckpointError(
                f"dtype {dtype!r} / shape {info.get('shape')!r}: a dtype name and a list of "
                "non-negative integer dimensions are required; the header is corrupt", file=file, tensor=name)
        if offsets is None or len(offsets) != 2:
            raise CheckpointError(
                f"data_offsets {info.get('data_offsets')!r} must be two non-negative integers "
                "[begin, end]; the header is corrupt", file=file, tensor=name)
        begin, end = offsets
        if dtype not in DTYPES:
            known = "known" if dtype in _ALL_DTYPES else "unknown"
            raise CheckpointError(
                f"dtype {dtype} ({known}) is not supported; the converter reads F32, F16 and BF16: "
                "save the checkpoint in one of those", file=file, tensor=name)
        if end < begin or end > data_size:
            raise CheckpointError(
                f"data_offsets [{begin}, {end}] point outside the {data_size}-byte data section; the "
                "shard is truncated or corrupt: download it again", file=file, tensor=name)
        expect = math.prod(shape) * DTYPES[dtype][0]
        if end - begin != expect:
            raise CheckpointError(
                f"data_offsets span {end - begin} bytes but {dtype}{list(shape)} needs {expect}; "
                "the header is corrupt", file=file, tensor=name)
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, end - begin)
    # overlap: sweep in start order, keeping the furthest end seen so far, so a tensor that
    # lies inside a long earlier one is caught even when its neighbours do not overlap
    spans = sorted((e for e in entries.values() if e.nbytes), key=lambda e: (e.begin, e.nbytes))
    reach: TensorEntry | None = None
    for e in spans:
        if reach is not None and e.begin < reach.begin + reach.nbytes:
            raise CheckpointError(
                f"data of {e.name!r} overlaps data of {reach.name!r}; the header is corrupt", file=file,
                tensor=e.name)
        if reach is None or e.begin + e.nbytes > reach.begin + reach.nbytes:
            reach = e
    return ShardHeader(file, file_size, data_start, entries, metadata)


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
