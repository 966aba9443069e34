"""quantize(bits="bf16"): raw bfloat16 rows widened on the quantizing threads give the
bytes of the widened float32 rows, for every type and both grids."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qatgguf.errors import NonFiniteError, QuantizationError
from qatgguf.quant import api, quantize

from .data import varied_rows
from .qat_synth import qat4
from .test_kernels_vs_ggml import TYPES


def _bits(x: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _widen(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bf16_bits_give_the_bytes_of_their_float32_values(
    t: T, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 4096)  # many chunks for the threads
    u = _bits(np.concatenate([varied_rows(1024, seed=5), varied_rows(1024, seed=6)]))
    want = quantize(_widen(u), t)
    assert np.array_equal(quantize(u, t, bits="bf16"), want)
    assert np.array_equal(quantize(u, t, bits="bf16", threads=3), want)


@pytest.mark.parametrize("t", [T.Q4_0, T.TQ2_0], ids=lambda t: t.name)
def test_bf16_bits_on_the_grid(t: T) -> None:
    w, _, _ = qat4(4096, "max/-8", "bf16", seed=3)
    u = _bits(w.reshape(16, -1))
    assert np.array_equal(quantize(u, t, grid="qat", bits="bf16"), quantize(_widen(u), t, grid="qat"))


def test_bf16_bits_errors_name_the_row_and_the_fix() -> None:
    u = _bits(np.ones((6, 256), np.float32))
    u[4, 17] = 0x7FC0  # NaN
    for t, grid in ((T.Q4_0, None), (T.Q4_0, "qat"), (T.Q6_K, None)):
        with pytest.raises(NonFiniteError, match=r"'w'.*row 4, column 17"):
            quantize(u, t, grid=grid, name="w", bits="bf16")
    with pytest.raises(QuantizationError, match="uint16.*float32.*Fix"):
        quantize(np.ones((1, 32), np.float32), T.Q4_0, bits="bf16")
    with pytest.raises(QuantizationError, match="unknown bits 'f8'"):
        quantize(u, T.Q4_0, bits="f8")
