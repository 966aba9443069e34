"""Quantization kernels: one registry of GGML types, byte layout as GGUF stores it."""

from __future__ import annotations

import os

# The block kernels are fixed-size loops that LLVM unrolls completely; only its SLP
# vectorizer (off in numba by default) turns the unrolled code into vector instructions
# (Q4_0 2.5x faster). It changes no result: no fast-math flag is set, so every float
# operation keeps its IEEE rounding. numba reads the variable when it is first imported;
# the config write covers a numba imported earlier. An explicit NUMBA_SLP_VECTORIZE wins.
# It is set at import of this package on purpose: every kernel module sits below it, so
# no kernel can be compiled before it runs, whichever entry point (convert, evaluate,
# fixtures, bench) starts the work; numba reads the flag when it first compiles.
if "NUMBA_SLP_VECTORIZE" not in os.environ:
    os.environ["NUMBA_SLP_VECTORIZE"] = "1"
    import numba.core.config

    numba.core.config.SLP_VECTORIZE = 1

from qatgguf.quant.api import default_threads, dequantize, quantize, resolve_type

__all__ = ["default_threads", "dequantize", "quantize", "resolve_type"]
