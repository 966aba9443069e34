"""NaN/Inf are reported with the first bad row for every type, whether the kernel flags
them on the way or the input is scanned before the kernel."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qatgguf.errors import NonFiniteError
from qatgguf.quant import api, quantize
from qatgguf.quant.registry import kernel_for

from .test_kernels_vs_ggml import TYPES


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, -np.inf, np.float32(np.inf)], ids=["nan", "-inf", "inf"])
@pytest.mark.parametrize("threads", [1, 3])
def test_first_bad_row_named(t: T, bad: float, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 2048)
    monkeypatch.setattr(api, "PIECE_ELEMENTS", 512)
    x = np.random.default_rng(0).standard_normal((40, 512)).astype(np.float32)
    x[23, 300] = bad  # in a later chunk (and piece) than the first
    x[31, 2] = bad  # a later chunk fails too: with threads it may fail first
    with pytest.raises(NonFiniteError, match=r"'w'.*row 23, column 300"):
        quantize(x, t, name="w", threads=threads)
    grid = "qat" if t in (T.Q4_0, T.TQ2_0) else None
    if grid:
        with pytest.raises(NonFiniteError, match=r"row 23, column 300"):
            quantize(x, t, grid=grid, threads=threads)


def test_kernels_that_flag_non_finite_say_so() -> None:
    # the flag is the kernel's return value: True for finite input, False otherwise
    for t in TYPES:
        k = kernel_for(t)
        if not k.checks_finite:
            continue
        x = np.ones(256, np.float32)
        out = np.empty(256 // k.block_size * k.type_size, np.uint8)
        assert k.quantize_blocks(x, out) is True, t.name
        x[100] = np.nan
        assert k.quantize_blocks(x, out) is False, t.name
