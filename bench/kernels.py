"""Kernel throughput beside ggml's C, same process, same data, one thread each.

    python bench/kernels.py [--rows 512] [--cols 8192] [--repeat 5] [--types Q4_0,Q8_0]

Prints MB/s of float32 input (best of --repeat) and ours/ggml. The grid-aligned rows
(`Q4_0+qat`, `TQ2_0+qat`) run on a synthetic bf16 QAT tensor and are compared with
ggml's reference quantizer on that same tensor. Each result is also checked byte for
byte against ggml (grid rows: against nothing, they differ by design).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qatgguf.quant import quantize
from tests.quant.ggml_ref import ggml_quantize

TYPES = [
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "TQ2_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
]
GRID_TYPES = ["Q4_0", "TQ2_0"]


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _qat_tensor(rows: int, cols: int, block: int, codes: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(1)
    nb = rows * cols // block
    s = np.exp(rng.normal(np.log(0.004), 0.6, nb)).astype(np.float32)
    k = rng.integers(codes[0], codes[1] + 1, (nb, block))
    w = (s[:, None] * k).astype(np.float32).view(np.uint32).astype(np.uint64)
    w = (((w + 0x7FFF + ((w >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return w.reshape(rows, cols)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES + [t + "+qat" for t in GRID_TYPES]))
    args = ap.parse_args()
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    print(
        f"input {args.rows}x{args.cols} float32 = {mb:.1f} MB; best of {args.repeat}; one thread each"
    )
    print(f"{'type':<11} {'ours MB/s':>10} {'ggml MB/s':>10} {'ratio':>6}  bytes")
    for name in args.types.split(","):
        grid = name.endswith("+qat")
        t = T[name.removesuffix("+qat")]
        data = x
        if grid:
            data = _qat_tensor(
                args.rows,
                args.cols,
                32 if t == T.Q4_0 else 256,
                (-8, 7) if t == T.Q4_0 else (-2, 1),
            )
        ours = quantize(data, t, grid="qat" if grid else None)  # also compiles / loads the cache
        ref = ggml_quantize(data, t)
        same = (
            "grid (differs by design)"
            if grid
            else ("identical" if np.array_equal(ours, ref) else "DIFFERENT")
        )
        g = "qat" if grid else None
        t_ours = _best(lambda d=data, t=t, g=g: quantize(d, t, grid=g), args.repeat)
        t_ref = _best(lambda d=data, t=t: ggml_quantize(d, t), args.repeat)
        print(
            f"{name:<11} {mb / t_ours:10.0f} {mb / t_ref:10.0f} {t_ref / t_ours:6.2f}  {same}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
