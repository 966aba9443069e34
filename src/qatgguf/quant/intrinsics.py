"""LLVM-level helpers for the numba kernels, for what numba has no word for: a clamp to
int32 codes that stays in 32-bit lanes, and a store of a select that LLVM keeps
unmasked."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def code_f32(typingctx, v, lo, hi):  # type: ignore[no-untyped-def]
    """float32(MAX(lo, MIN(hi, nearest_int(v)))), all in 32-bit lanes.

    The same bits as `nearest_int` and the C clamp; written at the LLVM level because
    numba widens int32 arithmetic to int64, and int64 -> float does not vectorize."""
    if v != types.float32 or not isinstance(lo, types.Integer) or not isinstance(hi, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        f, a, b = args
        i32 = ir.IntType(32)
        val = builder.fadd(f, ir.Constant(ir.FloatType(), 12582912.0))
        i = builder.bitcast(val, i32)
        li = builder.and_(i, ir.Constant(i32, 0x007FFFFF))
        li = builder.sub(li, ir.Constant(i32, 0x00400000))
        a32 = builder.trunc(a, i32) if a.type.width > 32 else a
        b32 = builder.trunc(b, i32) if b.type.width > 32 else b
        li = builder.select(builder.icmp_signed("<", li, b32), li, b32)
        li = builder.select(builder.icmp_signed(">", li, a32), li, a32)
        return builder.sitofp(li, ir.FloatType())

    return types.float32(v, lo, hi), codegen


@intrinsic
def select_store(typingctx, c, new, old):  # type: ignore[no-untyped-def]
    """`new if c else old`, for `a[i] = select_store(c, new, a[i])`: a plain store of a select.

    Written as a ternary, or as a bare select, LLVM sees that the store puts back the
    value just loaded when `c` is false, drops that path and vectorizes what is left as
    a masked store (slow, and a later load cannot take its value from it). `old` passes
    through a `freeze` first, which ends that reasoning and costs no instruction."""
    if c != types.boolean or new != types.float32 or old != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        frozen = ir.instructions.Instruction(builder.block, args[2].type, "freeze", [args[2]])
        builder._insert(frozen)
        return builder.select(args[0], args[1], frozen)

    return types.float32(c, new, old), codegen
