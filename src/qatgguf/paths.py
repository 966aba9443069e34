"""Where qatgguf keeps its machine-local caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$QATGGUF_CACHE`, else `~/.cache/qatgguf`: fixtures, the numba cache, the
    llama.cpp tools and the scratch folders of tasks. Never shared between machines."""
    return Path(os.environ.get("QATGGUF_CACHE") or Path.home() / ".cache" / "qatgguf")
