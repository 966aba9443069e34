"""Shared fixtures: the built-in tiny QAT family (built once, cached by content hash)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real services on 127.0.0.1: an S3-compatible server (moto) and a Hub-compatible server.
pytest_plugins = ["servers.s3", "servers.fakehub"]


@pytest.fixture(scope="session")
def tiny_family() -> dict[str, Path]:
    """{model name: checkpoint dir} for the tiny Gemma 4 QAT family: the five sizes and
    the mobile mixtures E2B-mobile and E4B-mobile."""
    from qatgguf.fixtures import build_family
    from qatgguf.paths import cache_root

    return build_family(cache_root() / "fixtures")


@pytest.fixture(scope="session")
def llama_tools() -> dict[str, Path]:
    """llama.cpp's command-line tools (llama-perplexity, llama-quantize, llama-gguf-split),
    built once per machine from the installed llama-cpp-python's sources and run against
    its libraries: the oracle for anything llama.cpp computes. `make test` builds them
    first; a failed build fails the tests that need them."""
    from qatgguf.llamacpp import ensure_tools

    return ensure_tools()
