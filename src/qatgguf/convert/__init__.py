"""Checkpoint (safetensors) to GGUF: plan, convert shard by shard, assemble."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qatgguf.convert.assemble import assemble
from qatgguf.convert.exactness import GGUFExactness, gguf_exactness
from qatgguf.convert.plan import ConversionPlan, MmprojTensor, ShardJob, TensorJob, plan_conversion
from qatgguf.convert.shard import PartInfo, convert_shard, read_manifest, write_direct
from qatgguf.recipes import Recipe

__all__ = ["ConversionPlan", "GGUFExactness", "MmprojTensor", "PartInfo", "ShardJob", "TensorJob",
           "assemble", "convert", "convert_shard", "gguf_exactness", "plan_conversion", "read_manifest"]


def convert(src: Path | str, out: Path | str, *, recipe: Recipe | str, split_max_size: int | None = None,
            workdir: Path | str | None = None, source_options: dict[str, Any] | None = None,
            threads: int | None = None) -> list[Path]:
    """Plan, convert every shard and assemble, in one process. Returns the written GGUF paths.

    `src` is a local checkpoint directory, `hf://org/repo@rev` or `s3://bucket/prefix`.
    Without `workdir` the tensors stream straight into the GGUF (one read of the checkpoint,
    one write of the output: no part files); with `workdir` part files are written there
    and assembled, as the distributed flow does. `threads` quantizes each tensor's rows in
    parallel (default: `quant.default_threads()`); the output does not depend on it."""
    plan = plan_conversion(src, recipe=recipe, source_options=source_options, hash_local=False)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with _local_checkpoint(plan, source_options, workdir) as root:
        if workdir is None:
            return write_direct(plan, Path(out), root=root, split_max_size=split_max_size, threads=threads)
        wd = Path(workdir)
        parts = [Path(convert_shard(plan, i, wd / f"part-{i:05d}.bin", shard=root / s.file if s.file else None,
                                    threads=threads).path)
                 for i, s in enumerate(plan.shards)]
        return assemble(plan, parts, Path(out), split_max_size=split_max_size)


@contextmanager
def _local_checkpoint(plan: ConversionPlan, source_options: Any, workdir: Path | str | None) -> Iterator[Path]:
    """The folder the shards are read from: the checkpoint itself when local, else a
    download of its shards (into `workdir`, or a temporary folder removed afterwards)."""
    from qatgguf.convert.source import SourceOptions, fetch_checkpoint

    if plan.source.local_dir is not None:
        yield plan.source.local_dir
        return
    opts = source_options if isinstance(source_options, SourceOptions) else SourceOptions.from_dict(source_options)
    names = [s.file for s in plan.shards if s.file]
    if workdir is not None:
        yield fetch_checkpoint(plan.source, Path(workdir) / "checkpoint", options=opts, names=names)
        return
    from qatgguf.paths import cache_root

    (cache_root() / "work").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qatgguf-ckpt-", dir=cache_root() / "work") as tmp:
        yield fetch_checkpoint(plan.source, Path(tmp), options=opts, names=names)
