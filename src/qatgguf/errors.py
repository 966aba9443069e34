"""Every error qatgguf raises on purpose.

Each message says what was found (file, tensor, value), which rule it breaks and how to
fix it. Errors subclass the built-in they refine so callers can catch either.
"""

from __future__ import annotations


class QatGgufError(Exception):
    """Base class of all qatgguf errors."""


class ConfigError(QatGgufError, ValueError):
    """A release config or recipe is invalid."""


class CheckpointError(QatGgufError, ValueError):
    """A checkpoint (config.json, index, safetensors shard) is missing, broken or inconsistent.

    Always names the file and, where one is involved, the tensor.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.file = file
        self.tensor = tensor
        self.message = message
        parts = []
        if file:
            parts.append(f"{file}")
        if tensor:
            parts.append(f"tensor {tensor!r}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class UnsupportedArchitectureError(CheckpointError):
    """config.json names an architecture the converter does not know."""


class UnknownTensorError(CheckpointError):
    """A checkpoint tensor has no mapping to a GGUF tensor."""


class QuantizationError(QatGgufError, ValueError):
    """A tensor cannot be quantized as asked (bad values, bad row length, unknown type)."""


class UnknownQuantTypeError(QuantizationError, KeyError):
    """A quantization type name or id that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(QuantizationError):
    """NaN or Inf in a tensor."""


class BlockSizeError(QuantizationError):
    """A row length that is not a multiple of the type's block size."""


class GGUFWriteError(QatGgufError, RuntimeError):
    """The GGUF writer was used out of order or with inconsistent data."""


class EvaluationError(QatGgufError, RuntimeError):
    """Evaluation could not run (vocab mismatch, corpus too short, llama.cpp failure)."""


class StoreError(QatGgufError, OSError):
    """The artifact store failed (missing object, digest mismatch, unreachable endpoint)."""


class PublishError(QatGgufError, RuntimeError):
    """Publishing to the Hub (or the local Hub folder) failed."""


class ModelCardError(QatGgufError, ValueError):
    """Model card data or the rendered card is invalid (bad metadata, missing files)."""
