"""Scalar float helpers that reproduce ggml's C float32 semantics inside numba kernels.

Every kernel in this package must round exactly like the C reference, so the helpers
here are bit-level ports, not approximations. numba promotes float32 op python-float
(and float32 op int) to float64, so the constants below are np.float32 and callers cast
integers with `F32(...)` before mixing them with floats.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

F32 = np.float32

MAGIC_NEAREST = F32(12582912.0)  # 1.5 * 2**23; ref: ggml-quants.c nearest_int
_SCALE_TO_INF = F32(2.0**112)  # ref: ggml-impl.h ggml_compute_fp32_to_fp16
_SCALE_TO_ZERO = F32(2.0**-110)
_EXP_SCALE = F32(2.0**-112)  # ref: ggml-impl.h ggml_compute_fp16_to_fp32
_HALF = F32(0.5)
_ONE = F32(1.0)
_ZERO = F32(0.0)


@intrinsic
def f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret a float32 as uint32 (a C `memcpy`/union cast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, u):  # type: ignore[no-untyped-def]
    """Reinterpret a uint32 as float32."""
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@njit(cache=True, nogil=True, inline="always")
def _fp32_to_fp16_soft(f: float) -> int:
    """float32 -> IEEE half bits, round-to-nearest-even, NaN -> 0x7E00.

    ref: ggml-impl.h ggml_compute_fp32_to_fp16 (the software path ggml-base is built with).
    """
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = f32_bits(f)
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    bias = max(bias, np.uint32(0x71000000))
    base = bits_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = f32_bits(base)
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@intrinsic
def _f16c_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """float32 -> IEEE half bits by the CPU's conversion (`fptrunc`; F16C's vcvtps2ph),
    round-to-nearest-even like the software path; a NaN keeps its payload's top bits."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        h = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def _fp32_to_fp16_f16c(f: float) -> int:
    """ggml_compute_fp32_to_fp16 through the hardware conversion: the same bits for every
    float32 (all 2**32 checked), once NaN is forced to ggml's 0x7E00 with its sign. A
    select, so loops over it vectorize."""
    u = f32_bits(f)
    nan = np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00))
    return nan if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else _f16c_bits(f)


def _has_f16c() -> bool:
    # numba compiles for the host CPU unless NUMBA_CPU_NAME names another target; without
    # F16C, LLVM would lower `fptrunc` to a runtime call the JIT does not provide
    if config.CPU_NAME not in (None, "host"):
        return False
    return bool(llvm.get_host_cpu_features().get("f16c", False))


HAS_F16C = _has_f16c()
# ref: ggml-impl.h ggml_compute_fp32_to_fp16 (the software path ggml-base is built with);
# both variants give its bits for every float32
fp32_to_fp16 = _fp32_to_fp16_f16c if HAS_F16C else _fp32_to_fp16_soft


@njit(cache=True, nogil=True, inline="always")
def fp16_to_fp32(h: int) -> float:
    """IEEE half bits -> float32. ref: ggml-impl.h ggml_compute_fp16_to_fp32."""
    w = np.uint32(np.uint32(h) << np.uint32(16))
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w + w)
    exp_offset = np.uint32(0xE0 << 23)
    normalized = bits_f32(np.uint32((two_w >> np.uint32(4)) + exp_offset)) * _EXP_SCALE
    magic_mask = np.uint32(126 << 23)
    denormalized = bits_f32(np.uint32((two_w >> np.uint32(17)) | magic_mask)) - _HALF
    if two_w < np.uint32(1 << 27):
        r = f32_bits(denormalized)
    else:
        r = f32_bits(normalized)
    return bits_f32(np.uint32(sign | r))


@njit(cache=True, nogil=True, inline="always")
def fp32_to_bf16(f: float) -> int:
    """float32 -> bfloat16 bits, RNE, NaN forced quiet. ref: ggml-impl.h ggml_compute_fp32_to_bf16."""
    u = f32_bits(f)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16(
        np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    )


@njit(cache=True, nogil=True, inline="always")
def nearest_int(fval: float) -> int:
    """Round half to even through the 1.5*2**23 trick, bit for bit (also outside its range).

    ref: ggml-quants.c nearest_int
    """
    val = fval + MAGIC_NEAREST
    i = np.int32(f32_bits(val))
    return (i & np.int32(0x007FFFFF)) - np.int32(0x00400000)


_TWO_23 = F32(8388608.0)


@njit(cache=True, nogil=True, inline="always")
def floor_small(y: float) -> int:
    """floor(y) as int32 for 0 <= y < 2**23 (equal to C's truncating cast there).

    Read off the bits of floor(y) + 2**23, whose low mantissa bits hold the integer:
    LLVM vectorizes floor and this bit read, while numba's float-to-int cast stays scalar.
    """
    return np.int32(f32_bits(np.floor(y) + _TWO_23) - np.uint32(0x4B000000))


@njit(cache=True, nogil=True, inline="always")
def cvtt_i32(v: float) -> int:
    """C float -> int conversion as x86 `cvttss2si` does it: truncation, and
    0x80000000 (INT_MIN) for NaN, Inf and anything out of int32 range."""
    if v >= F32(-2147483648.0) and v < F32(2147483648.0):
        return np.int64(v)
    return np.int64(-2147483648)


@njit(cache=True, nogil=True, inline="always")
def to_i8(i: int) -> int:
    """Low byte of an int read as int8_t (C's narrowing conversion)."""
    return ((i & 0xFF) ^ 0x80) - 0x80


@njit(cache=True, nogil=True, inline="always")
def roundf(x: float) -> float:
    """C roundf: half away from zero, in float32."""
    t = np.trunc(x)
    if abs(x - t) >= _HALF:
        if x > _ZERO:
            t = t + _ONE
        else:
            t = t - _ONE
    return t


# Branch-free min/max: a select, as C's MIN/MAX macros compile; numba's builtin min/max
# on integers branches, which mispredicts on data-dependent clamps.
@njit(cache=True, nogil=True, inline="always")
def imin(a: int, b: int) -> int:
    return a if a < b else b  # noqa: FURB136 (a select; min() branches)


@njit(cache=True, nogil=True, inline="always")
def imax(a: int, b: int) -> int:
    return a if a > b else b  # noqa: FURB136 (a select; max() branches)


# Not inlined: an inlined helper that takes an array costs two refcount operations per call.
@njit(cache=True, nogil=True)
def put_f16(out: np.ndarray, o: int, h: int) -> None:
    """Store an fp16 bit pattern little-endian at byte offset o."""
    out[o] = h & 0xFF
    out[o + 1] = (h >> 8) & 0xFF


@njit(cache=True, nogil=True)
def get_f16(data: np.ndarray, o: int) -> float:
    """Read the little-endian fp16 at byte offset o as float32."""
    return fp16_to_fp32(np.uint16(data[o]) | (np.uint16(data[o + 1]) << np.uint16(8)))


@njit(cache=True, nogil=True)
def max_magnitude(u: np.ndarray, sign_off: int) -> int:
    """The largest `u[i] & sign_off` of float bits `u` (uint16 or uint32; `sign_off` masks
    the sign away): an integer max that vectorizes, in the order of the magnitudes. NaN and
    Inf are the values at or above the all-ones exponent. `u` must not be empty."""
    m = u[0] & sign_off
    for i in range(1, u.size):
        m = max(m, u[i] & sign_off)
    return m
