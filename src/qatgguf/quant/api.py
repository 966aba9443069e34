"""Public entry points. (First version: delegates to gguf-py; replaced by our own kernels.)"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

from qatgguf.errors import BlockSizeError, NonFiniteError, UnknownQuantTypeError


def resolve_type(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise UnknownQuantTypeError(f"unknown quantization type {qtype!r}") from None
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnknownQuantTypeError(f"unknown quantization type id {qtype!r}") from None


def quantize(x: np.ndarray, qtype, *, grid: str | None = None) -> np.ndarray:
    t = resolve_type(qtype)
    block, _ = GGML_QUANT_SIZES[t]
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % block:
        raise BlockSizeError(f"{t.name} needs rows that are a multiple of {block}; got {x.shape[-1]}")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x.reshape(-1, x.shape[-1])).any(axis=1))[0][0])
        raise NonFiniteError(f"row {row} holds NaN or Inf")
    return quants.quantize(x, t)


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    return quants.dequantize(np.asarray(data), resolve_type(qtype))
