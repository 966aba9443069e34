"""ggml's own C quantizers and decoders through ctypes: the reference the kernels must match.

The library is the ggml-base that llama-cpp-python installs (`llama_cpp/lib`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType


def ggml_lib_path() -> Path:
    override = os.environ.get("QATGGUF_GGML_BASE_LIB")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed; it provides libggml-base.so")
    return Path(spec.origin).parent / "lib" / "libggml-base.so"


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def load_ggml_base(path: Path, *, deepbind: bool = False) -> ctypes.CDLL:
    """A ggml-base library with the signatures used here. `deepbind` makes the library
    resolve its own symbols first (RTLD_DEEPBIND), so a second build loaded into the same
    process runs its own quantizers, not the first one's."""
    mode = ctypes.RTLD_LOCAL | (os.RTLD_DEEPBIND if deepbind else 0)
    so = ctypes.CDLL(str(path), mode=mode)
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_blck_size.restype = ctypes.c_int64
    so.ggml_blck_size.argtypes = [ctypes.c_int]
    so.ggml_type_size.restype = ctypes.c_size_t
    so.ggml_type_size.argtypes = [ctypes.c_int]
    so.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    so.ggml_validate_row_data.restype = ctypes.c_bool
    so.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return so


@cache
def lib() -> ctypes.CDLL:
    return load_ggml_base(ggml_lib_path())


def block_and_size(t: GGMLQuantizationType) -> tuple[int, int]:
    return int(lib().ggml_blck_size(int(t))), int(lib().ggml_type_size(int(t)))


def ggml_quantize(
    x: np.ndarray, t: GGMLQuantizationType, *, so: ctypes.CDLL | None = None
) -> np.ndarray:
    """ggml_quantize_chunk over all rows of x (2-D float32), no importance matrix; `so` is
    another ggml-base build (default: the installed one)."""
    so = so or lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.shape
    blk, size = block_and_size(t)
    out = np.zeros((nrows, n // blk * size), dtype=np.uint8)
    so.ggml_quantize_init(int(t))
    written = so.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, nrows, n, None)
    assert written == out.nbytes
    return out


def ggml_dequantize(data: np.ndarray, t: GGMLQuantizationType) -> np.ndarray:
    """The type's `to_float` over every row of data (2-D uint8)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    blk, size = block_and_size(t)
    nrows, nbytes = data.shape
    out = np.empty((nrows, nbytes // size * blk), dtype=np.float32)
    fn = _TO_FLOAT(lib().ggml_get_type_traits(int(t)).contents.to_float)
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


def ggml_validate(data: np.ndarray, t: GGMLQuantizationType) -> bool:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return bool(lib().ggml_validate_row_data(int(t), data.ctypes.data, data.nbytes))
