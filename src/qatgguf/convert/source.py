"""Where a checkpoint comes from: a local directory, `hf://org/repo@revision` (a Hub
snapshot of only the files the converter reads) or `s3://bucket/prefix` (through the
artifact store). Remote sources are materialised into a local cache directory."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Any

from qatgguf.errors import CheckpointError

# the files the converter reads; pickles (*.bin, *.pt) are never fetched
NEEDED_PATTERNS = ("config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors",
                   "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "README.md",
                   "processor_config.json", "preprocessor_config.json")


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("QATGGUF_CACHE", Path.home() / ".cache" / "qatgguf")) / "checkpoints"


def parse_hf_url(url: str) -> tuple[str, str | None]:
    """`hf://org/repo@rev` -> ("org/repo", "rev"); the revision is optional."""
    body = url[len("hf://"):]
    repo, _, rev = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{url!r} is not hf://org/repo[@revision]", file=url)
    return repo, rev or None


def resolve_source(src: str | Path, *, cache_dir: Path | None = None, hf_endpoint: str | None = None,
                   hf_token: str | None = None, **store_opts: Any) -> Path:
    """Local directory holding the checkpoint named by `src`. `store_opts` go to
    `qatgguf.store.open_store` for s3:// sources. Raises `CheckpointError`."""
    text = str(src)
    if text.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, rev = parse_hf_url(text)
        try:
            path = snapshot_download(repo_id=repo, revision=rev, allow_patterns=list(NEEDED_PATTERNS),
                                     cache_dir=str(_cache_root(cache_dir) / "hf"), endpoint=hf_endpoint,
                                     token=hf_token)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds
            # the exception text never carries the token; the type and message are enough
            msg = str(exc).replace(hf_token, "***") if hf_token else str(exc)
            raise CheckpointError(f"cannot download from the Hub: {type(exc).__name__}: {msg}",
                                  file=text) from None
        return Path(path)
    if text.startswith("s3://"):
        from qatgguf.store import open_store

        store = open_store(text, **store_opts)
        # the last prefix component names the directory: general.name comes from it
        leaf = text.rstrip("/").rsplit("/", 1)[-1]
        dest = _cache_root(cache_dir) / "s3" / hashlib.sha256(text.encode()).hexdigest()[:16] / leaf
        dest.mkdir(parents=True, exist_ok=True)
        keys = [k for k in store.list("") if "/" not in k
                and any(fnmatch.fnmatch(k, p) for p in NEEDED_PATTERNS)]
        if not keys:
            raise CheckpointError("no checkpoint files (config.json, *.safetensors) under this prefix",
                                  file=text)
        for k in keys:
            ref = store.stat(k)
            target = dest / k
            if target.is_file() and ref is not None and target.stat().st_size == ref.size:
                continue
            store.get_file(k, target, sha256=ref.sha256 if ref else None)
        return dest
    path = Path(text)
    if not path.is_dir():
        raise CheckpointError("checkpoint directory does not exist", file=text)
    return path
