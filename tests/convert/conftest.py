"""Tiny checkpoints built once per session (transformers, random weights, bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiny_gemma as tiny

@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory, tokenizer_dir):
    cache: dict[tuple, Path] = {}

    def make(variant: str, *, legacy: bool = False) -> Path:
        key = (variant, legacy)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{variant}{'_legacy' if legacy else ''}")
            cache[key] = tiny.build_gemma4(out / "ckpt", tokenizer_dir, variant, legacy=legacy)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def vendored_llama_cpp() -> Path:
    """llama.cpp's source as the installed llama-cpp-python vendors it (its converter is the oracle)."""
    from qatgguf.llamacpp import vendored_llama_cpp

    return vendored_llama_cpp()
