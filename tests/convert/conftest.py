"""Tiny checkpoints built once per session (transformers, random weights, bf16)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import tiny_gemma as tiny

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


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
def vendored_llama_cpp(tmp_path_factory) -> Path:
    """llama.cpp source as llama-cpp-python 0.3.36 vendors it (its converter is the oracle)."""
    for cand in (os.environ.get("QATGGUF_LLAMA_CPP_SRC"),
                 "/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"):
        if cand and (Path(cand) / "convert_hf_to_gguf.py").is_file():
            return Path(cand)
    cache = Path(os.environ.get("QATGGUF_CACHE", Path.home() / ".cache" / "qatgguf")) / "sdist"
    root = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(cache)], check=True)
        with tarfile.open(cache / "llama_cpp_python-0.3.36.tar.gz") as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and
                       ("/conversion/" in m.name or "/gguf-py/" in m.name or m.name.endswith("convert_hf_to_gguf.py"))]
            tf.extractall(cache, members=members, filter="data")
    return root
