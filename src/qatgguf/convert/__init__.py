"""Checkpoint (safetensors) to GGUF: plan, convert shard by shard, assemble."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from qatgguf.convert.assemble import assemble
from qatgguf.convert.plan import ConversionPlan, MmprojTensor, ShardJob, TensorJob, plan_conversion
from qatgguf.convert.shard import PartInfo, convert_shard, read_manifest
from qatgguf.recipes import Recipe

__all__ = ["ConversionPlan", "MmprojTensor", "PartInfo", "ShardJob", "TensorJob", "assemble",
           "convert", "convert_shard", "plan_conversion", "read_manifest"]


def convert(src: Path | str, out: Path | str, *, recipe: Recipe | str, split_max_size: int | None = None,
            workdir: Path | str | None = None, source_options: dict[str, Any] | None = None) -> list[Path]:
    """Plan, convert every shard and assemble, in one process. Returns the written GGUF paths.

    `src` is a local checkpoint directory, `hf://org/repo@rev` or `s3://bucket/prefix`. Part files go to `workdir` (a temporary directory
    removed afterwards when not given)."""
    plan = plan_conversion(src, recipe=recipe, source_options=source_options)
    own = workdir is None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    wd = Path(tempfile.mkdtemp(prefix="qatgguf-parts-", dir=Path(out).parent)) if own else Path(workdir)
    try:
        parts = [Path(convert_shard(plan, i, wd / f"part-{i:05d}.bin").path) for i in range(len(plan.shards))]
        return assemble(plan, parts, Path(out), split_max_size=split_max_size)
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
