"""Streaming GGUF writer: header, KV data and tensor infos from plain data, tensor bytes
copied in afterwards by the caller, one tensor (chunk) at a time.

The byte layout is GGUF v3 as gguf-py's `GGUFWriter` writes it (ref: gguf-py
gguf_writer.py `write_header_to_file`, `write_kv_data_to_file`, `write_ti_data_to_file`,
`_pack_val`); split files follow gguf-split (ref: tools/gguf-split/gguf-split.cpp,
gguf-py `GGUFWriter.add_shard_kv_data`, `SHARD_NAME_FORMAT`).
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from gguf import GGMLQuantizationType, GGUFValueType

from qatgguf.errors import GGUFWriteError
from qatgguf.quant.registry import type_size

GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
GGUF_VERSION = 3
ALIGNMENT = 32  # ref: gguf-py constants.py GGUF_DEFAULT_ALIGNMENT
SHARD_NAME_FORMAT = "{:s}-{:05d}-of-{:05d}.gguf"  # ref: gguf-py constants.py

_SIMPLE = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True)
class KV:
    """One metadata entry. `vtype`/`sub_type` are `GGUFValueType` values (ints, JSON-able)."""

    key: str
    vtype: int
    value: Any
    sub_type: int | None = None

    def to_json(self) -> list[Any]:
        return [self.key, self.vtype, self.value, self.sub_type]

    @classmethod
    def from_json(cls, item: Sequence[Any]) -> KV:
        key, vtype, value, sub_type = item
        return cls(key=key, vtype=int(vtype), value=value, sub_type=sub_type)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the GGUF header lists it. `shape` is numpy (row-major) order."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    nbytes: int


def tensor_nbytes(shape: Sequence[int], qtype: int | GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (row-major, last dim = row length) stored as `qtype`."""
    block, nbytes = type_size(GGMLQuantizationType(int(qtype)))
    n = 1
    for d in shape:
        n *= int(d)
    if shape and shape[-1] % block:
        raise GGUFWriteError(
            f"row length {shape[-1]} is not a multiple of the {GGMLQuantizationType(int(qtype)).name} "
            f"block size {block}"
        )
    return n // block * nbytes


def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _pack_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(raw)) + raw


def pack_value(value: Any, vtype: int, sub_type: int | None = None) -> bytes:
    """Bytes of one value without its leading type id (ref: gguf-py `_pack_val`)."""
    vt = GGUFValueType(vtype)
    fmt = _SIMPLE.get(vt)
    if fmt is not None:
        return struct.pack(fmt, value)
    if vt == GGUFValueType.STRING:
        return _pack_string(value)
    if vt == GGUFValueType.ARRAY:
        if sub_type is None:
            raise GGUFWriteError("an array value needs its element type (sub_type)")
        st = GGUFValueType(sub_type)
        out = bytearray(struct.pack("<IQ", st, len(value)))
        sfmt = _SIMPLE.get(st)
        if sfmt is not None:
            # one struct call for the whole array: token scores/types hold 262k entries
            out += struct.pack("<" + sfmt[1] * len(value), *value)
        elif st == GGUFValueType.STRING:
            for item in value:
                out += _pack_string(item)
        else:
            raise GGUFWriteError(f"unsupported array element type {st.name}")
        return bytes(out)
    raise GGUFWriteError(f"unsupported GGUF value type {vt.name}")


def array_sub_type(values: Sequence[Any]) -> int:
    """Element type gguf-py infers for a Python list (ref: constants.py GGUFValueType.get_type)."""
    if isinstance(values, (bytes, bytearray)):
        return int(GGUFValueType.UINT8)
    return int(GGUFValueType.get_type(values[0]))


class _State(Enum):
    START = auto()
    HEADER = auto()
    DATA = auto()
    DONE = auto()


class GGUFFileWriter:
    """Writes one GGUF file: `write_header()` once, then `begin_tensor()`/`write()` for each
    tensor in header order, then `finish()`. Says which state it expected when misused."""

    def __init__(self, fh: BinaryIO, kvs: Sequence[KV], tensors: Sequence[TensorInfo]):
        self._fh = fh
        self._kvs = list(kvs)
        self._tensors = list(tensors)
        self._state = _State.START
        self._next = 0
        self._written = 0

    def _expect(self, *states: _State) -> None:
        if self._state not in states:
            raise GGUFWriteError(
                f"GGUF writer expected state {' or '.join(s.name for s in states)}, got {self._state.name}"
            )

    def write_header(self) -> None:
        self._expect(_State.START)
        fh = self._fh
        buf = bytearray(struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self._tensors), len(self._kvs)))
        for kv in self._kvs:
            buf += _pack_string(kv.key)
            buf += struct.pack("<I", kv.vtype)
            buf += pack_value(kv.value, kv.vtype, kv.sub_type)
        offset = 0
        for ti in self._tensors:
            buf += _pack_string(ti.name)
            buf += struct.pack("<I", len(ti.shape))
            for d in reversed(ti.shape):  # ggml order: ne[0] is the row length
                buf += struct.pack("<Q", d)
            buf += struct.pack("<IQ", ti.qtype, offset)
            offset += pad(ti.nbytes)
        buf += b"\0" * (pad(len(buf)) - len(buf))
        fh.write(buf)
        self._state = _State.HEADER

    def begin_tensor(self, name: str) -> TensorInfo:
        self._expect(_State.HEADER, _State.DATA)
        if self._state == _State.DATA:
            self._end_tensor()
        if self._next >= len(self._tensors):
            raise GGUFWriteError(f"tensor {name!r} is beyond the {len(self._tensors)} tensors of the header")
        ti = self._tensors[self._next]
        if ti.name != name:
            raise GGUFWriteError(f"expected tensor {ti.name!r} next (header order), got {name!r}")
        self._state = _State.DATA
        self._written = 0
        return ti

    def write(self, chunk: bytes | memoryview) -> None:
        self._expect(_State.DATA)
        self._fh.write(chunk)
        self._written += len(chunk)

    def _end_tensor(self) -> None:
        ti = self._tensors[self._next]
        if self._written != ti.nbytes:
            raise GGUFWriteError(f"tensor {ti.name!r}: wrote {self._written} bytes, header says {ti.nbytes}")
        self._fh.write(b"\0" * (pad(ti.nbytes) - ti.nbytes))
        self._next += 1

    def finish(self) -> None:
        self._expect(_State.HEADER, _State.DATA)
        if self._state == _State.DATA:
            self._end_tensor()
        if self._next != len(self._tensors):
            raise GGUFWriteError(f"finished after {self._next} of {len(self._tensors)} tensors")
        self._state = _State.DONE


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'50M' -> 50_000_000, as gguf-split and convert_hf_to_gguf read --split-max-size
    (decimal units; ref: convert_hf_to_gguf.py split_str_to_n_bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"split size {text!r} is not a number with an optional K, M, G or T suffix")
    mult = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def header_nbytes(kvs: Sequence[KV], tensors: Sequence[TensorInfo]) -> int:
    """Bytes of a GGUF header (key/values and tensor infos, padded) for these entries."""
    buf = io.BytesIO()
    GGUFFileWriter(buf, kvs, tensors).write_header()
    return buf.tell()


def split_tensors(tensors: Sequence[TensorInfo], max_size: int | None) -> list[list[TensorInfo]]:
    """Group tensors into files: a new file starts when the next tensor would push the
    current one past `max_size` (ref: gguf-py GGUFWriter.add_tensor_info)."""
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for ti in tensors:
        if max_size and groups[-1] and size + ti.nbytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(ti)
        size += ti.nbytes
    return groups


def shard_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(SHARD_NAME_FORMAT.format(out.stem, i + 1, n)) for i in range(n)]


def split_kvs(index: int, count: int, n_tensors: int) -> list[KV]:
    return [
        KV("split.no", int(GGUFValueType.UINT16), index),
        KV("split.count", int(GGUFValueType.UINT16), count),
        KV("split.tensors.count", int(GGUFValueType.INT32), n_tensors),
    ]
