"""qatgguf: QAT checkpoints to GGUF files that run in llama.cpp, evaluated, gated, published."""

from __future__ import annotations

__version__ = "0.1.0"
