"""Test inputs that stress every rounding path of the kernels."""

from __future__ import annotations

import numpy as np

F16_MAX = 65504.0


def varied_rows(n: int, *, seed: int = 0) -> np.ndarray:
    """Rows of length n, each a different distribution or edge case."""
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []

    def add(r: np.ndarray) -> None:
        rows.append(np.asarray(r, dtype=np.float32).reshape(-1)[:n])

    for scale in (1.0, 0.02, 1e-3, 30.0):
        add(rng.standard_normal(n) * scale)
    add(rng.standard_t(2, n))  # heavy tails
    add(rng.standard_cauchy(n) * 0.01)
    add(rng.laplace(size=n))
    add(np.zeros(n))
    add(np.full(n, 0.75))
    add(np.full(n, -3.0))
    add(rng.integers(-8, 8, n) * 0.5)  # ties at .5 after scaling
    add(rng.integers(-40, 40, n) * 0.25)
    add((rng.integers(0, 2, n) * 2 - 1) * 0.5)
    add(np.arange(n) % 17 - 8.5)
    add(rng.uniform(-1, 1, n) * F16_MAX)  # scales overflow fp16 after division
    add(rng.uniform(-1, 1, n) * 1e5)
    add(rng.uniform(-1, 1, n) * 1e-6)  # fp16 subnormal scales
    add(rng.uniform(-1, 1, n) * 1e-38)  # float32 subnormals
    add(rng.uniform(-1, 1, n) * 1e-42)
    add(rng.standard_normal(n) * 6e-5)
    # blocks mixing zero, constant and random pieces
    mixed = rng.standard_normal(n)
    mixed[: n // 4] = 0.0
    mixed[n // 4 : n // 2] = 1.25
    add(mixed)
    sparse = np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n))
    add(sparse)
    pos = np.abs(rng.standard_normal(n)) + 3.0  # all positive: min > 0 paths
    add(pos)
    add(-pos)
    # 16-element sub-blocks 1e4 and 1e9 times smaller than their neighbours: their
    # scales round to zero in the super-block's 6/8-bit scale, a path of its own
    spread = rng.standard_normal(n)
    spread.reshape(-1, 16)[::3] *= 1e-4
    spread.reshape(-1, 16)[1::5] *= 1e-9
    add(spread)
    bf = (rng.standard_normal(n).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    add(bf)
    for _ in range(8):
        add(rng.standard_normal(n) * np.exp(rng.uniform(-6, 3)))
    return np.stack(rows)
