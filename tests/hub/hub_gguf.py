"""Small but real GGUF files for the publisher tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter


def write_tiny_gguf(path: Path, *, arch: str, seed: int, n: int = 4096) -> Path:
    """A small but real GGUF file (header, metadata, one F32 tensor)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name(path.stem)
    writer.add_tensor(
        "token_embd.weight",
        np.random.default_rng(seed).standard_normal((n // 64, 64), dtype=np.float32),
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
