"""Content keys: where each step's output lives in the artifact store.

A step's output key is the sha256 of everything that decides its bytes, so a step that
finds its key in the store has nothing to do, a rerun redoes only what changed, and two
runs that compute the same key write the same object (conditionally: the first writer
wins). The inputs of each key:

| output | key inputs |
|---|---|
| plan | source snapshot (revision, every file's digest), recipe digest, converter version |
| shard part | source shard digest, the plan's entries for that shard, recipe digest, the versions of the kernels those entries use, converter version |
| GGUF file(s) | its parts' keys, digest of the metadata (tokenizer, template, config), split size, converter version |
| projector | source digests of the tower shards and config, projector plan, converter version |
| base records | the base file's evaluation digest, corpus sha256, context and llama.cpp settings, llama.cpp commit |
| evaluation range | the quant file's evaluation digest, the base record key, the chunk range, settings, llama.cpp commit |

A file's *evaluation digest* covers its tensor bytes and every metadata key except the
chat template: llama-perplexity never applies the template, so a template fix changes
the file (and its publish) but not one evaluation number. Everything else (tokenizer,
hyper-parameters) takes part, since it can change the tokens or the logits.

Bump `CONVERTER_VERSION` when the converter writes other bytes for the same input (name
maps, metadata, transforms, part or GGUF layout), and a kernel's entry in
`quant.registry.KERNEL_VERSIONS` when that kernel does: exactly the keys that depend on
it change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

# The bytes the converter writes for a given input and recipe (not the kernels' bytes).
CONVERTER_VERSION = 1

CAS = "cas"  # store prefix of content-addressed outputs


def digest(obj: Any) -> str:
    """sha256 of a JSON value, keys sorted: equal inputs, equal digest, on any machine."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json).encode()).hexdigest()


def _json(o: Any) -> Any:
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"{type(o).__name__} is not part of a content key")


def content_key(kind: str, **inputs: Any) -> str:
    """The key of an output of `kind` (plan, part, gguf, mmproj, base-records, eval-range,
    eval-result) from the inputs that decide its bytes."""
    return digest({"kind": kind, **inputs})


def cas_key(kind: str, key: str, name: str) -> str:
    """Store key of a content-addressed object: `cas/<kind>/<key[:2]>/<key>/<name>`."""
    return f"{CAS}/{kind}/{key[:2]}/{key}/{name}"


def recipe_digest(name: str) -> str:
    """sha256 over the recipe file and every file it extends, as stored in the package."""
    from qatgguf.recipes.recipe import recipe_sources

    return digest(recipe_sources(name))


def kernel_versions(types: Iterable[tuple[str, str | None]]) -> dict[str, int]:
    """{"Q4_0": 1, "Q4_0/grid=qat": 1, ...}: the kernel versions a set of (type, grid) uses."""
    from qatgguf.quant.registry import kernel_version

    return {f"{t}/grid={g}" if g else t: kernel_version(t, g) for t, g in sorted(set(types), key=str)}


EVAL_EXCLUDED_KEYS = ("tokenizer.chat_template",)


def metadata_digest(kvs: Iterable[Any], *, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over GGUF key/values (`gguf.writer.KV`), leaving out keys that start with any
    of `exclude`."""
    return digest([kv.to_json() for kv in kvs if not kv.key.startswith(exclude)])


def tool_versions() -> dict[str, str]:
    """The versions a release records: qatgguf, converter, llama.cpp commit, gguf-py."""
    import importlib.metadata

    from qatgguf import __version__
    from qatgguf.llamacpp import ggml_commit

    return {"qatgguf": __version__, "converter": str(CONVERTER_VERSION), "llama_cpp": ggml_commit(),
            "gguf": importlib.metadata.version("gguf")}

