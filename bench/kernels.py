"""Kernel throughput beside ggml's C, two builds of it: the one llama-cpp-python ships and
one compiled for this CPU. Same process, same data, one thread each.

    python bench/kernels.py [--rows 2048] [--cols 4096] [--repeat 5] [--types Q4_0,Q8_0]

Columns, in MB/s of float32 input (best of --repeat rounds; each round times ours and
both builds back to back, so load from other processes hits all three alike):

* shipped: `libggml-base.so` as llama-cpp-python installs it (what llama-quantize runs;
  built for a generic x86-64, no AVX/FMA). Our bytes must equal its bytes.
* native: the same ggml sources (`vendor/llama.cpp` of the installed version's sdist)
  configured with `-DCMAKE_C_FLAGS=-march=native` (Release: -O3), what a user who builds
  llama.cpp for the machine runs. Built once into the cache (`$QATGGUF_CACHE/bench`).

The byte columns say whether ours and the native build give the shipped build's bytes,
on the timed input and on the tests' edge-case rows (`tests/quant/data.varied_rows`:
scales from tiny to huge, ties, zero and constant blocks); where the native build differs, a third build with `-march=native -ffp-contract=off`
shows whether FMA contraction is the only reason. The grid rows (`Q4_0+qat`, `TQ2_0+qat`)
run on a synthetic bf16 QAT tensor and are timed against ggml's plain quantizer of the
same type on that tensor (their bytes differ by design).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qatgguf.llamacpp import ggml_commit, vendored_llama_cpp
from qatgguf.paths import cache_root
from qatgguf.quant import quantize
from tests.quant.data import varied_rows
from tests.quant.ggml_ref import ggml_lib_path, ggml_quantize, load_ggml_base

TYPES = [
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q2_K",
    "Q3_K",
    "TQ2_0",
]
GRID_TYPES = ["Q4_0", "TQ2_0"]
NATIVE_FLAGS = "-march=native"
NO_CONTRACT_FLAGS = "-march=native -ffp-contract=off"


def native_ggml_base(c_flags: str) -> Path:
    """libggml-base built from the installed llama.cpp's sources with `c_flags` (Release,
    -O3), once per machine, flags and commit."""
    tag = hashlib.sha256(c_flags.encode()).hexdigest()[:8]
    home = cache_root() / "bench" / f"ggml-base-{ggml_commit()}-{tag}"
    lib = home / "libggml-base.so"
    if lib.is_file():
        return lib
    build = home / "build"
    shutil.rmtree(build, ignore_errors=True)
    src = vendored_llama_cpp()
    opts = [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_C_FLAGS={c_flags}",
        f"-DCMAKE_CXX_FLAGS={c_flags}",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ]
    print(f"building ggml-base with {c_flags!r} into {home} (once)", flush=True)
    for cmd in (
        ["cmake", "-S", str(src), "-B", str(build), *opts],
        ["cmake", "--build", str(build), "--target", "ggml-base", "-j", str(os.cpu_count() or 1)],
    ):
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    built = (build / "bin" / "libggml-base.so").resolve()
    shutil.copy2(built, home / "libggml-base.so.tmp")
    os.replace(home / "libggml-base.so.tmp", lib)
    (home / "FLAGS").write_text(c_flags + "\n")
    shutil.rmtree(build, ignore_errors=True)
    return lib


def _qat_tensor(rows: int, cols: int, block: int, codes: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(1)
    nb = rows * cols // block
    s = np.exp(rng.normal(np.log(0.004), 0.6, nb)).astype(np.float32)
    k = rng.integers(codes[0], codes[1] + 1, (nb, block))
    w = (s[:, None] * k).astype(np.float32).view(np.uint32).astype(np.uint64)
    w = (((w + 0x7FFF + ((w >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return w.reshape(rows, cols)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES + [t + "+qat" for t in GRID_TYPES]))
    args = ap.parse_args()
    shipped = load_ggml_base(ggml_lib_path())
    native = load_ggml_base(native_ggml_base(NATIVE_FLAGS), deepbind=True)
    no_contract = load_ggml_base(native_ggml_base(NO_CONTRACT_FLAGS), deepbind=True)
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    edge = np.concatenate([varied_rows(4096, seed=s) for s in range(1, 5)])
    mb = x.nbytes / 1e6
    print(
        f"input {args.rows}x{args.cols} float32 = {mb:.1f} MB; best of {args.repeat} interleaved "
        f"rounds; one thread each; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'type':<10} {'ours':>7} {'shipped':>8} {'native':>7}  {'ours/shipped':>12} "
        f"{'ours/native':>11}  ours=shipped  native=shipped  native,-ffp-contract=off=shipped"
    )
    for name in args.types.split(","):
        grid = name.endswith("+qat")
        t = T[name.removesuffix("+qat")]
        g = "qat" if grid else None
        data = x
        if grid:
            block, codes = (32, (-8, 7)) if t == T.Q4_0 else (256, (-2, 1))
            data = _qat_tensor(args.rows, args.cols, block, codes)
        quantize(data, t, grid=g)  # compiles or loads the numba cache before timing
        if grid:
            same, nat_same, off_same = "grid (by design)", "-", "-"
        else:
            # the timed input, then the edge-case rows
            def both(fn, data=data):
                return np.concatenate([fn(data).reshape(-1), fn(edge).reshape(-1)])

            ref = both(lambda d, t=t: ggml_quantize(d, t, so=shipped))
            same = (
                "identical"
                if np.array_equal(both(lambda d, t=t: quantize(d, t)), ref)
                else "DIFFERENT"
            )
            nat = both(lambda d, t=t: ggml_quantize(d, t, so=native))
            nat_same = (
                "identical" if np.array_equal(nat, ref) else f"{int((nat != ref).sum())} B differ"
            )
            off = both(lambda d, t=t: ggml_quantize(d, t, so=no_contract))
            off_same = (
                "identical" if np.array_equal(off, ref) else f"{int((off != ref).sum())} B differ"
            )
        best = {"ours": np.inf, "shipped": np.inf, "native": np.inf}
        for _ in range(args.repeat):
            best["ours"] = min(best["ours"], _time(lambda d=data, t=t, g=g: quantize(d, t, grid=g)))
            for k, so in (("shipped", shipped), ("native", native)):
                best[k] = min(best[k], _time(lambda d=data, t=t, so=so: ggml_quantize(d, t, so=so)))
        print(
            f"{name:<10} {mb / best['ours']:7.0f} {mb / best['shipped']:8.0f} "
            f"{mb / best['native']:7.0f}  {best['shipped'] / best['ours']:12.2f} "
            f"{best['native'] / best['ours']:11.2f}  {same:<12}  {nat_same:<14}  {off_same}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
