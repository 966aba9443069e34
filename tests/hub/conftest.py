"""Hub test files: small real GGUFs to publish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture
def gguf_files(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "gguf"
    out.mkdir()
    return {
        "Q4_0": write_tiny_gguf(out / "tiny-gemma4-Q4_0.gguf", arch="gemma4", seed=1),
        "Q8_0": write_tiny_gguf(out / "tiny-gemma4-Q8_0.gguf", arch="gemma4", seed=2),
        "mmproj": write_tiny_gguf(out / "mmproj-BF16.gguf", arch="clip", seed=3, n=1024),
    }
