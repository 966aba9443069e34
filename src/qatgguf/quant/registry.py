"""The one table of GGML types and the registry of kernels.

A type's block size and byte size live in `TYPE_SIZES` only; a kernel class registers
itself with `class Q4_0(BlockQuant, qtype=GGMLQuantizationType.Q4_0)`. Kernels see flat,
contiguous float32 blocks and flat bytes; shapes, row chunking and input checks happen
once here and in `qatgguf.quant.api`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T

from qatgguf.errors import UnknownQuantTypeError

# (elements per block, bytes per block); ref: ggml.c type_traits, gguf constants.py
TYPE_SIZES: dict[T, tuple[int, int]] = {
    T.F32: (1, 4),
    T.F16: (1, 2),
    T.BF16: (1, 2),
    T.Q4_0: (32, 2 + 16),
    T.Q4_1: (32, 2 + 2 + 16),
    T.Q5_0: (32, 2 + 4 + 16),
    T.Q5_1: (32, 2 + 2 + 4 + 16),
    T.Q8_0: (32, 2 + 32),
    T.Q8_1: (32, 2 + 2 + 32),  # ggml: f16 d and s (gguf-py 0.19 lists 40)
    T.Q2_K: (256, 2 + 2 + 256 // 16 + 256 // 4),
    T.Q3_K: (256, 2 + 256 // 4 + 256 // 8 + 12),
    T.Q4_K: (256, 2 + 2 + 256 // 2 + 12),
    T.Q5_K: (256, 2 + 2 + 256 // 2 + 256 // 8 + 12),
    T.Q6_K: (256, 2 + 256 // 2 + 256 // 4 + 256 // 16),
    T.Q8_K: (256, 4 + 256 + 256 // 8),
    T.IQ2_XXS: (256, 2 + 256 // 4),
    T.IQ2_XS: (256, 2 + 256 // 4 + 256 // 32),
    T.IQ3_XXS: (256, 2 + 256 // 4 + 256 // 8),
    T.IQ1_S: (256, 2 + 256 // 8 + 256 // 16),
    T.IQ4_NL: (32, 2 + 16),
    T.IQ3_S: (256, 2 + 256 // 4 + 256 // 8 + 256 // 32 + 4),
    T.IQ2_S: (256, 2 + 256 // 4 + 256 // 16),
    T.IQ4_XS: (256, 2 + 2 + 256 // 2 + 256 // 64),
    T.I8: (1, 1),
    T.I16: (1, 2),
    T.I32: (1, 4),
    T.I64: (1, 8),
    T.F64: (1, 8),
    T.IQ1_M: (256, 256 // 8 + 256 // 16 + 256 // 32),
    T.TQ1_0: (256, 2 + 4 * 13),
    T.TQ2_0: (256, 2 + 64),
    T.MXFP4: (32, 1 + 16),
}

# The types llama-quantize falls back to when a row length is not a multiple of the
# type's block size; types with block size 32 or less that still do not fit go to F16
# (the same function's last step). ref: src/llama-quant.cpp tensor_type_fallback
FALLBACK_TYPES: dict[str, str] = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

# The version of the bytes a kernel writes, per (type, grid): bump an entry when that
# kernel's output for the same input changes, and exactly the content keys of the parts
# that use it change (qatgguf.keys). Types not listed are at version 1.
KERNEL_VERSIONS: dict[tuple[str, str | None], int] = {}


def kernel_version(qtype: str, grid: str | None = None) -> int:
    return KERNEL_VERSIONS.get((qtype, grid), 1)


KernelQ = Callable[[np.ndarray, np.ndarray], None]
KernelD = Callable[[np.ndarray, np.ndarray], None]


def type_size(qtype: T) -> tuple[int, int]:
    """(block size, bytes per block) of `qtype`; raises UnknownQuantTypeError."""
    try:
        return TYPE_SIZES[qtype]
    except KeyError:
        raise UnknownQuantTypeError(
            f"GGML type {qtype.name} has no entry in the type table; "
            f"known: {', '.join(t.name for t in TYPE_SIZES)}"
        ) from None


class BlockQuant:
    """A GGML block format: `quantize_blocks(x_f32_flat, out_u8_flat)` and
    `dequantize_blocks(data_u8_flat, out_f32_flat)`, both numba kernels that work on whole
    blocks laid out back to back (rows do not matter to any block format).

    A kernel with `checks_finite = True` returns False when its input holds a NaN or Inf
    (found on the way, at no extra pass); the caller then locates it. Other kernels see
    input that was scanned before them."""

    qtype: ClassVar[T]
    checks_finite: ClassVar[bool] = False
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    quantize_blocks: ClassVar[KernelQ]
    dequantize_blocks: ClassVar[KernelD]

    def __init_subclass__(cls, *, qtype: T, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = type_size(qtype)
        if qtype in KERNELS:
            raise RuntimeError(
                f"two kernels registered for {qtype.name}: {KERNELS[qtype].__name__}, {cls.__name__}"
            )
        KERNELS[qtype] = cls


KERNELS: dict[T, type[BlockQuant]] = {}


def kernel_for(qtype: T) -> type[BlockQuant]:
    """The registered kernel class of `qtype`; raises UnknownQuantTypeError naming it."""
    load_kernels()
    try:
        return KERNELS[qtype]
    except KeyError:
        raise UnknownQuantTypeError(
            f"no quantization kernel for GGML type {qtype.name}; "
            f"available: {', '.join(sorted(t.name for t in KERNELS))}"
        ) from None


def load_kernels() -> None:
    # Importing the family modules registers their classes.
    from qatgguf.quant import floats, kquants, legacy, ternary  # noqa: F401
