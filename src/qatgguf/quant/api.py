"""Public entry points: `quantize`, `dequantize`, `resolve_type`.

Input checks, shapes and row chunking happen here once; the kernels in the family modules
(`legacy`, `kquants`, `ternary`, `floats`) see flat float32 blocks and flat bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from qatgguf.errors import BlockSizeError, NonFiniteError, QuantizationError, UnknownQuantTypeError
from qatgguf.quant._fp import max_magnitude
from qatgguf.quant.registry import FALLBACK_TYPES, KERNELS, kernel_for, load_kernels, type_size

# Rows are converted and quantized this many float32 elements at a time, so memory beyond
# the output stays bounded for any tensor length.
CHUNK_ELEMENTS = 1 << 20

# Within a chunk, the NaN/Inf scan and the kernel take turns on pieces this large (a
# multiple of every block size) so the kernel reads what the scan just pulled into L2
# instead of a second pass over memory.
PIECE_ELEMENTS = 1 << 16

GRIDS = ("qat",)

_Item = TypeVar("_Item")

log = logging.getLogger(__name__)


def default_threads() -> int:
    """Threads for quantizing a tensor: OMP_NUM_THREADS when set (Ray sets it to a task's
    CPUs), otherwise the CPUs this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _each(fn: Callable[[_Item], None], items: Sequence[_Item], threads: int) -> None:
    """fn over items, on `threads` threads (the kernels release the GIL). The error of the
    earliest failing item is the one raised, as in a sequential loop."""
    if threads <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(min(threads, len(items))) as ex:
        for _ in ex.map(fn, items):
            pass


def resolve_type(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """GGML type from a name ("Q4_K", case-insensitive), an id or the enum.

    Raises UnknownQuantTypeError naming the value.
    """
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.strip().upper()]
        except KeyError:
            known = ", ".join(t.name for t in GGMLQuantizationType)
            raise UnknownQuantTypeError(
                f"unknown quantization type {qtype!r}; known: {known}"
            ) from None
    try:
        return GGMLQuantizationType(int(qtype))
    except (ValueError, TypeError):
        raise UnknownQuantTypeError(f"unknown quantization type id {qtype!r}") from None


def row_bytes(qtype: str | int | GGMLQuantizationType, n: int) -> int:
    """Bytes one row of `n` elements takes in `qtype` (n must be a multiple of the block)."""
    t = resolve_type(qtype)
    block, size = type_size(t)
    _check_row_length(t, n, block, None)
    return n // block * size


@njit(cache=True, nogil=True)
def _first_nonfinite(u: np.ndarray) -> int:
    # An integer max over the magnitude bits vectorizes; the position is searched only
    # when the chunk holds a NaN or Inf (exponent bits all ones).
    if u.size == 0 or max_magnitude(u, np.uint32(0x7FFFFFFF)) < np.uint32(0x7F800000):
        return -1
    for i in range(u.size):
        if (u[i] & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000):
            return i
    return -1


def _check_row_length(t: GGMLQuantizationType, n: int, block: int, name: str | None) -> None:
    if n % block == 0 and n > 0:
        return
    where = f"tensor {name!r}: " if name else ""
    fallback = FALLBACK_TYPES.get(t.name)
    fix = (
        f"use {fallback} for this tensor (llama-quantize's fallback), or a type with a block size dividing {n}"
        if fallback
        else f"use a type whose block size divides {n} (F16, BF16 or F32 always do)"
    )
    raise BlockSizeError(
        f"{where}{t.name} needs rows whose length is a multiple of its block size {block}; "
        f"the row length is {n}. Fix: {fix}"
    )


def _prepare(x: np.ndarray, t: GGMLQuantizationType, name: str | None) -> tuple[np.ndarray, int]:
    if x.ndim == 0:
        raise QuantizationError(
            f"{'tensor ' + repr(name) + ': ' if name else ''}cannot quantize a 0-d scalar"
        )
    block, _ = type_size(t)
    n = int(x.shape[-1])
    _check_row_length(t, n, block, name)
    return x.reshape(-1, n), n


def _chunks(nrows: int, n: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    return [(r, min(nrows, r + step)) for r in range(0, nrows, step)]


@njit(cache=True, nogil=True)
def _widen_bf16(u: np.ndarray, out: np.ndarray) -> None:
    # exact: a bf16 is the top half of a float32
    for i in range(u.size):
        out[i] = np.uint32(u[i]) << np.uint32(16)


def _f32_chunk(rows: np.ndarray, r0: int, r1: int, bits: str | None = None) -> np.ndarray:
    if bits == "bf16":
        u = np.ascontiguousarray(rows[r0:r1]).reshape(-1)
        out = np.empty(u.size, np.uint32)
        _widen_bf16(u, out)
        return out.view(np.float32)
    return np.ascontiguousarray(rows[r0:r1], dtype=np.float32).reshape(-1)


def _pieces(size: int) -> list[tuple[int, int]]:
    return [(p, min(size, p + PIECE_ELEMENTS)) for p in range(0, size, PIECE_ELEMENTS)]


def _check_finite(c: np.ndarray, offset: int, n: int, name: str | None) -> None:
    """Raise NonFiniteError naming the first NaN/Inf of flat rows `c` (element `offset` of
    the tensor's flat rows of length `n`)."""
    bad = _first_nonfinite(c.view(np.uint32))
    if bad < 0:
        return
    flat = offset + bad
    where = f"tensor {name!r}" if name else "tensor"
    raise NonFiniteError(
        f"{where} holds a non-finite value ({c[bad]}) in row {flat // n}, column {flat % n} "
        f"(the first bad row); llama.cpp rejects rows with NaN or Inf. "
        f"Fix: repair or re-export the checkpoint."
    )


def quantize(
    x: np.ndarray,
    qtype: str | int | GGMLQuantizationType,
    *,
    grid: str | None = None,
    name: str | None = None,
    threads: int = 1,
    bits: str | None = None,
) -> np.ndarray:
    """Quantize float rows `x` (shape (..., n)) to GGML blocks, bytes as GGUF stores them.

    Returns uint8 of shape (..., n // block * type_size). Without `grid` the bytes equal
    ggml's `ggml_quantize_chunk` (no importance matrix). `grid="qat"` (Q4_0, TQ2_0, Q8_0)
    recovers the integer grid a QAT checkpoint was trained on and keeps it; blocks that
    are not on a grid get the reference encoding. `name` only labels error messages.
    `threads` > 1 quantizes row chunks in parallel; the bytes do not depend on it.
    `bits="bf16"`: `x` holds bfloat16 bit patterns (uint16, as a safetensors BF16 tensor
    stores them), widened to float32 chunk by chunk on the quantizing threads, which
    gives the bytes of `quantize(bf16 values as float32)` without a float32 copy of `x`.

    Raises BlockSizeError (row length), NonFiniteError (NaN/Inf; names the first bad row),
    UnknownQuantTypeError, QuantizationError (unsupported grid or bits).
    """
    t = resolve_type(qtype)
    kernel = kernel_for(t)
    x = np.asarray(x)
    if bits not in (None, "bf16"):
        raise QuantizationError(f"unknown bits {bits!r}; supported: 'bf16' or None")
    if bits == "bf16" and x.dtype != np.uint16:
        raise QuantizationError(
            f"{'tensor ' + repr(name) + ': ' if name else ''}bits='bf16' needs the raw uint16 "
            f"bit patterns, got dtype {x.dtype}. Fix: pass the BF16 tensor's uint16 view"
        )
    rows, n = _prepare(x, t, name)
    out = np.empty((*x.shape[:-1], n // kernel.block_size * kernel.type_size), dtype=np.uint8)
    out_rows = out.reshape(rows.shape[0], -1)
    bs, ts = kernel.block_size, kernel.type_size
    chunks = _chunks(rows.shape[0], n)
    if grid is None:
        q = kernel.quantize_blocks

        def plain(chunk: tuple[int, int]) -> None:
            r0, r1 = chunk
            c = _f32_chunk(rows, r0, r1, bits)
            o = out_rows[r0:r1].reshape(-1)
            if kernel.checks_finite:
                if not q(c, o):
                    _check_finite(c, r0 * n, n, name)
                return
            for p0, p1 in _pieces(c.size):
                piece = c[p0:p1]
                _check_finite(piece, r0 * n + p0, n, name)
                q(piece, o[p0 // bs * ts : p1 // bs * ts])

        _each(plain, chunks, threads)
        return out
    if grid not in GRIDS:
        raise QuantizationError(f"unknown grid {grid!r}; supported: {', '.join(GRIDS)} or None")
    from qatgguf.quant.lattice import grid_encoder

    enc = grid_encoder(t, name=name)
    flat_out = out_rows.reshape(-1)

    def on_grid(chunk: tuple[int, int]) -> None:
        r0, r1 = chunk
        c = _f32_chunk(rows, r0, r1, bits)
        for p0, p1 in _pieces(c.size):
            piece = c[p0:p1]
            b0 = (r0 * n + p0) // bs * ts
            # the encoder flags NaN/Inf on its way; the scan that names the row runs only then
            if not enc.encode(piece, flat_out[b0 : b0 + (p1 - p0) // bs * ts], pos=b0):
                _check_finite(piece, r0 * n + p0, n, name)

    _each(on_grid, chunks, threads)
    enc.finish(flat_out)
    st = enc.stats
    log.info("%s: %s on the %s grid: %d of %d blocks exact (%.2f%%), %d with an exact scale", name or "tensor",
             t.name, grid, st.on_grid, st.blocks, 100 * st.fraction, st.exact_scale)
    return out


def dequantize(data: np.ndarray, qtype: str | int | GGMLQuantizationType) -> np.ndarray:
    """Decode GGML blocks (uint8 rows of shape (..., nbytes), or a typed F32/F16 array) to
    float32 of shape (..., n), exactly as ggml's `to_float` does.

    Types without a kernel here (IQ formats, MXFP4, ...) are decoded with gguf-py.
    Raises UnknownQuantTypeError, QuantizationError (byte length not a whole number of blocks).
    """
    t = resolve_type(qtype)
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        arr = np.ascontiguousarray(arr).view(np.uint8)
    if arr.ndim == 0:
        raise QuantizationError("cannot dequantize a 0-d value")
    load_kernels()
    if t not in KERNELS:
        from gguf import quants

        return np.asarray(quants.dequantize(arr, t), dtype=np.float32)
    kernel = KERNELS[t]
    nbytes = int(arr.shape[-1])
    if nbytes % kernel.type_size:
        raise QuantizationError(
            f"{t.name} rows must be a whole number of {kernel.type_size}-byte blocks; got {nbytes} bytes per row"
        )
    n = nbytes // kernel.type_size * kernel.block_size
    rows = np.ascontiguousarray(arr.reshape(-1, nbytes))
    out = np.empty((*arr.shape[:-1], n), dtype=np.float32)
    kernel.dequantize_blocks(rows.reshape(-1), out.reshape(-1))
    return out
