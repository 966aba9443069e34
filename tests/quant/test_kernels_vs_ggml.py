"""Every kernel against ggml's C (ctypes into the ggml-base that llama-cpp-python ships)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from qatgguf.quant import dequantize, quantize
from qatgguf.quant.registry import KERNELS, TYPE_SIZES, load_kernels

from .data import varied_rows
from .ggml_ref import block_and_size, ggml_dequantize, ggml_quantize, ggml_validate

TYPES = [
    T.F32,
    T.F16,
    T.BF16,
    T.Q8_0,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.TQ2_0,
]


def _first_diff(a: np.ndarray, b: np.ndarray, blk_bytes: int) -> str:
    idx = np.argwhere(a != b)
    r, c = (int(v) for v in idx[0])
    return (
        f"{len(idx)} bytes differ; first at row {r}, block {c // blk_bytes}, byte {c % blk_bytes}"
    )


def test_type_table_matches_ggml_and_gguf() -> None:
    load_kernels()
    for t, (blk, size) in TYPE_SIZES.items():
        if t != T.Q8_1:  # gguf-py 0.19 lists 40 bytes; ggml's block_q8_1 has f16 d and s
            assert GGML_QUANT_SIZES[t] == (blk, size), t.name
        assert block_and_size(t) == (blk, size), t.name
    assert set(TYPES) <= set(KERNELS)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_bytes_equal_ggml(t: T) -> None:
    _, size = TYPE_SIZES[t]
    n = 1024
    x = np.concatenate([varied_rows(n, seed=1), varied_rows(n, seed=2)])
    ours = quantize(x, t)
    ref = ggml_quantize(x, t)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), _first_diff(ours, ref, size)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_many_gaussian_rows_equal_ggml(t: T) -> None:
    rng = np.random.default_rng(int(t))
    x = (rng.standard_normal((64, 4096)) * rng.uniform(1e-3, 2.0, (64, 1))).astype(np.float32)
    ours = quantize(x, t)
    ref = ggml_quantize(x, t)
    assert np.array_equal(ours, ref), _first_diff(ours, ref, TYPE_SIZES[t][1])
    assert ggml_validate(ours, t)  # llama.cpp's own row check accepts what we write


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_ggml_to_float(t: T) -> None:
    if t == T.F32:
        pytest.skip("ggml has no to_float for F32 (it is the float type)")
    x = varied_rows(512, seed=3)
    q = ggml_quantize(x, t)
    ours = dequantize(q, t)
    ref = ggml_dequantize(q, t)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("t", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.TQ2_0], ids=lambda t: t.name)
def test_dequantize_random_bytes_equal_ggml(t: T) -> None:
    # arbitrary bit patterns reach codes and scales the quantizers never emit (e.g. TQ2_0 q=3)
    _, size = TYPE_SIZES[t]
    rng = np.random.default_rng(7)
    q = rng.integers(0, 256, (8, 4 * size), dtype=np.uint8)
    for b in range(4):  # keep the f16 scales finite so the comparison is about the codes
        for off in {T.Q4_0: (0,), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q6_K: (208,), T.TQ2_0: (64,)}[t]:
            q[:, b * size + off + 1] &= 0x3B
    ours = dequantize(q, t)
    ref = ggml_dequantize(q, t)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_near_half_ties_q4_0_q8_0() -> None:
    # values that land on x*id = k + 0.5 exactly, the truncation and roundf paths
    base = np.array(
        [-8.0] + [k + 0.5 for k in range(-8, 7)] + [0.5 * k for k in range(16)], dtype=np.float32
    )
    x = np.stack([base * s for s in (1.0, 0.125, 3.0, 1e-4, 7.0 / 3.0)])
    for t in (T.Q4_0, T.Q8_0, T.Q5_0, T.Q4_1, T.Q5_1):
        assert np.array_equal(quantize(x, t), ggml_quantize(x, t)), t.name


def test_leading_dims_and_dtypes() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    q = quantize(x, "q4_k")
    assert q.shape == (2, 3, 144)
    assert np.array_equal(q.reshape(6, 144), ggml_quantize(x.reshape(6, 256), T.Q4_K))
    assert np.array_equal(quantize(x.astype(np.float64), T.Q8_0), quantize(x, T.Q8_0))
    assert dequantize(q, T.Q4_K).shape == (2, 3, 256)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_threads_do_not_change_bytes(t: T, monkeypatch: pytest.MonkeyPatch) -> None:
    from qatgguf.quant import api

    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 4096)  # many chunks for the threads to share
    x = np.concatenate([varied_rows(1024, seed=3), varied_rows(1024, seed=4)])
    one = quantize(x, t)
    assert np.array_equal(quantize(x, t, threads=3), one)
    assert np.array_equal(one, ggml_quantize(x, t))


@pytest.mark.parametrize("t", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("blocks", [1, 3, 7])
def test_odd_super_block_counts_equal_ggml(t: T, blocks: int) -> None:
    # the K-quant kernels search super-blocks in pairs; an odd count leaves one alone
    x = varied_rows(256 * blocks, seed=blocks)
    for row in x[:12]:
        assert np.array_equal(quantize(row[None], t), ggml_quantize(row[None], t)), t.name
    assert np.array_equal(quantize(x, t), ggml_quantize(x, t))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_signed_zeros_and_magnitude_ties_equal_ggml(t: T) -> None:
    # all-zero blocks that start with -0.0 (C's max stays +0.0) and blocks whose largest
    # magnitude comes with both signs (C keeps the first)
    n = 1024
    rng = np.random.default_rng(11)
    neg = np.full(n, -0.0)
    mixed = np.where(rng.random(n) < 0.5, -0.0, 0.0)
    ties = rng.integers(-3, 4, n) * 0.25
    ties[::32] = -0.75
    ties[5::32] = 0.75
    ties2 = -ties
    x = np.stack([neg, mixed, ties, ties2]).astype(np.float32)
    assert np.array_equal(quantize(x, t), ggml_quantize(x, t))
