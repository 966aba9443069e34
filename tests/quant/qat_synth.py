"""Synthetic QAT checkpoints: w = bf16(s * k) per block, for the recipes QAT toolkits use."""

from __future__ import annotations

import numpy as np


def round_bf16(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def round_scale(s: np.ndarray, rounding: str) -> np.ndarray:
    s = s.astype(np.float32)
    if rounding == "f16":
        return s.astype(np.float16).astype(np.float32)
    if rounding == "bf16":
        return round_bf16(s)
    return s


def qat4(
    nblocks: int, recipe: str, rounding: str, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w (nblocks, 32) bf16-valued float32, k (nblocks, 32) int, s (nblocks,) signed scale)."""
    rng = np.random.default_rng(seed)
    if recipe == "uniform":
        s = round_scale(np.exp(rng.normal(np.log(0.004), 0.6, nblocks)), rounding)
        k = rng.integers(-8, 8, (nblocks, 32))
    else:
        z = rng.standard_normal((nblocks, 32)) * np.exp(rng.normal(np.log(0.03), 0.5, (nblocks, 1)))
        amax = np.abs(z).max(axis=1)
        if recipe == "max/-8":
            signed_max = z[np.arange(nblocks), np.abs(z).argmax(axis=1)]
            s, lo, hi = signed_max / -8.0, -8, 7
        elif recipe == "amax/7.5":
            s, lo, hi = amax / 7.5, -8, 7
        elif recipe == "amax/7":
            s, lo, hi = amax / 7.0, -7, 7
        else:
            raise ValueError(recipe)
        s = round_scale(s, rounding)
        k = np.clip(np.rint(z / s[:, None]), lo, hi).astype(np.int64)
    w = round_bf16((s[:, None] * k).astype(np.float32))
    return w, k, s


def qat2(
    nblocks: int, codes: tuple[int, int], rounding: str, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-bit grid per 256 block: k in [codes[0], codes[1]], s > 0."""
    rng = np.random.default_rng(seed)
    s = round_scale(np.exp(rng.normal(np.log(0.01), 0.6, nblocks)), rounding)
    k = rng.integers(codes[0], codes[1] + 1, (nblocks, 256))
    w = round_bf16((s[:, None] * k).astype(np.float32))
    return w, k, s


def qat8(nblocks: int, rounding: str, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit grid per block of 32 with a learned-looking scale: the block maximum lands
    anywhere in [90, 127] (clipped at 127), k in [-127, 127], s > 0."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((nblocks, 32)) * np.exp(rng.normal(np.log(0.03), 0.5, (nblocks, 1)))
    s = round_scale(np.abs(z).max(axis=1) / rng.uniform(90, 140, nblocks), rounding)
    k = np.clip(np.rint(z / s[:, None]), -127, 127).astype(np.int64)
    w = round_bf16((s[:, None] * k).astype(np.float32))
    return w, k, s
