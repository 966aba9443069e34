"""Hub test files: small real GGUFs to publish."""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_gguf import write_tiny_gguf


@pytest.fixture
def gguf_files(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "gguf"
    out.mkdir()
    return {
        "Q4_0": write_tiny_gguf(out / "tiny-gemma4-Q4_0.gguf", arch="gemma4", seed=1),
        "Q8_0": write_tiny_gguf(out / "tiny-gemma4-Q8_0.gguf", arch="gemma4", seed=2),
        "mmproj": write_tiny_gguf(out / "mmproj-BF16.gguf", arch="clip", seed=3, n=1024),
    }
