"""The scalar float helpers every kernel builds on, over every float32 bit pattern."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from numba import njit

from qatgguf.quant import _fp
from qatgguf.quant._fp import bits_f32

from .ggml_ref import ggml_quantize


@njit(nogil=True)
def _fp16_mismatches(hi0: int, hi1: int) -> int:
    # every float32 whose top 16 bits are in [hi0, hi1): hardware conversion vs ggml's
    # bit-level routine
    bad = 0
    for hi in range(hi0, hi1):
        for lo in range(65536):
            f = bits_f32(np.uint32((hi << 16) | lo))
            bad += _fp._fp32_to_fp16_f16c(f) != _fp._fp32_to_fp16_soft(f)
    return bad


@pytest.mark.skipif(not _fp.HAS_F16C, reason="this CPU has no F16C; the software path is used")
def test_hardware_fp16_equals_ggml_routine_for_every_float32() -> None:
    assert _fp.fp32_to_fp16 is _fp._fp32_to_fp16_f16c
    assert _fp16_mismatches(0, 65536) == 0


def test_fp16_of_nan_inf_and_subnormals_equals_ggml() -> None:
    specials = np.array(
        [
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0xFFBFFFFF,
            0x7F800000,
            0xFF800000,
            0x00000001,
            0x80000001,
            0x33000000,
            0x33000001,
            0x387FE000,
            0x387FF000,
            0x477FF000,
            0x477FEFFF,
        ],
        dtype=np.uint32,
    )
    x = np.tile(specials, 3).view(np.float32).reshape(3, -1)
    from qatgguf.quant.floats import _f16_quantize

    out = np.empty(x.size * 2, np.uint8)
    _f16_quantize(x.reshape(-1), out)  # the kernel flags NaN/Inf; its bytes still follow ggml
    assert np.array_equal(out.reshape(3, -1), ggml_quantize(x, T.F16))
