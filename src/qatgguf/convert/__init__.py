"""Checkpoint (safetensors) to GGUF: plan, convert shard by shard, assemble."""

from __future__ import annotations

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
    plan = plan_conversion(src, recipe=recipe, source_options=source_options)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if workdir is None:
        return write_direct(plan, Path(out), split_max_size=split_max_size, threads=threads)
    wd = Path(workdir)
    parts = [Path(convert_shard(plan, i, wd / f"part-{i:05d}.bin", threads=threads).path)
             for i in range(len(plan.shards))]
    return assemble(plan, parts, Path(out), split_max_size=split_max_size)
