"""Quantization kernels: one registry of GGML types, byte layout as GGUF stores it."""

from __future__ import annotations

from qatgguf.quant.api import dequantize, quantize, resolve_type

__all__ = ["dequantize", "quantize", "resolve_type"]
