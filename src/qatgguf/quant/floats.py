"""Plain float formats: F32, F16, BF16 (block size 1).

F16 and BF16 give the bits of ggml's own conversions (`ggml_fp32_to_fp16_row`,
`ggml_fp32_to_bf16_row_ref`), the ones `ggml_quantize_chunk` runs. F16 converts with the
CPU's half-precision instruction where it has one (`_fp.fp32_to_fp16`: the same bits for
every float32, 16 lanes at a time, where ggml-base runs the bit-level software routine).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from qatgguf.quant._fp import fp16_to_fp32, fp32_to_bf16, fp32_to_fp16, imax
from qatgguf.quant.registry import BlockQuant

_ABS = np.uint32(0x7FFFFFFF)
_EXP_ALL = np.uint32(0x7F800000)  # magnitude bits at or above: Inf or NaN


@njit(cache=True, nogil=True)
def _f32_quantize(x: np.ndarray, out: np.ndarray) -> None:
    out.view(np.float32)[:] = x


@njit(cache=True, nogil=True)
def _f32_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    y[:] = data.view(np.float32)


class F32Type(BlockQuant, qtype=T.F32):
    quantize_blocks = staticmethod(_f32_quantize)
    dequantize_blocks = staticmethod(_f32_dequantize)


@njit(cache=True, nogil=True)
def _f16_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    # ref: ggml.c ggml_fp32_to_fp16_row; returns False when x holds NaN or Inf
    o = out.view(np.uint16)
    xu = x.view(np.uint32)
    seen = np.uint32(0)
    for i in range(x.size):
        o[i] = fp32_to_fp16(x[i])
        a = xu[i] & _ABS
        seen = imax(seen, a)
    return seen < _EXP_ALL


@njit(cache=True, nogil=True)
def _f16_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    h = data.view(np.uint16)
    for i in range(y.size):
        y[i] = fp16_to_fp32(h[i])


class F16Type(BlockQuant, qtype=T.F16):
    checks_finite = True
    quantize_blocks = staticmethod(_f16_quantize)
    dequantize_blocks = staticmethod(_f16_dequantize)


@njit(cache=True, nogil=True)
def _bf16_quantize(x: np.ndarray, out: np.ndarray) -> bool:
    # ref: ggml.c ggml_fp32_to_bf16_row_ref; returns False when x holds NaN or Inf
    o = out.view(np.uint16)
    xu = x.view(np.uint32)
    seen = np.uint32(0)
    for i in range(x.size):
        o[i] = fp32_to_bf16(x[i])
        a = xu[i] & _ABS
        seen = imax(seen, a)
    return seen < _EXP_ALL


@njit(cache=True, nogil=True)
def _bf16_dequantize(data: np.ndarray, y: np.ndarray) -> None:
    h = data.view(np.uint16)
    yu = y.view(np.uint32)
    for i in range(y.size):
        yu[i] = np.uint32(h[i]) << np.uint32(16)


class BF16Type(BlockQuant, qtype=T.BF16):
    checks_finite = True
    quantize_blocks = staticmethod(_bf16_quantize)
    dequantize_blocks = staticmethod(_bf16_dequantize)
