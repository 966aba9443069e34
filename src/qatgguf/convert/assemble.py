"""Assembly: GGUF header from the plan, tensor bytes copied from the parts in plan order,
each tensor's sha256 checked on the way; written under a temporary name, renamed at the end."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Sequence

from gguf import GGMLQuantizationType

from qatgguf.convert.plan import ConversionPlan
from qatgguf.convert.shard import read_manifest
from qatgguf.errors import GGUFWriteError
from qatgguf.files import atomic_output
from qatgguf.gguf.writer import GGUFFileWriter, shard_paths, split_kvs, split_tensors

COPY_CHUNK = 16 * 1024 * 1024


def assemble(plan: ConversionPlan, parts: Sequence[Path], out: Path, *,
             split_max_size: int | None = None) -> list[Path]:
    """Write the GGUF file(s) of `plan` from its part files. With `split_max_size` the output
    is split as gguf-split does (`<stem>-00001-of-0000N.gguf`, `split.*` keys). Each
    tensor's type and size come from the part manifests, checked against what the plan
    allows (a `grid: auto` tensor: one of its candidates or the recipe's type). Returns the
    written paths. Raises `GGUFWriteError` for a missing tensor, a type or size the plan
    does not allow, or a digest mismatch."""
    out = Path(out)
    where: dict[str, tuple[Path, dict]] = {}
    for p in parts:
        for t in read_manifest(Path(p))["tensors"]:
            where[t["name"]] = (Path(p), t)
    jobs = plan.tensors
    for name in plan.order:
        if name not in where:
            raise GGUFWriteError(f"no part holds tensor {name!r}; convert every shard job first")
    # a grid: auto tensor's type is the one its shard task detected; the plan says which
    # types it may take and what each one's size is
    types = {name: where[name][1]["type"] for name in plan.auto_tensors}
    for name, qtype in types.items():
        if qtype not in jobs[name].allowed:
            raise GGUFWriteError(f"part entry of {name!r} has type {qtype}, which the plan does not allow "
                                 f"({', '.join(jobs[name].allowed)}): convert the shard again with this plan")
    infos = plan.tensor_infos(types)
    for ti in infos:
        _, t = where[ti.name]
        if (t["nbytes"] != ti.nbytes or int(GGMLQuantizationType[t["type"]]) != ti.qtype
                or tuple(t["shape"]) != ti.shape):
            raise GGUFWriteError(f"part entry of {ti.name!r} ({t['type']}{t['shape']}, {t['nbytes']} B) "
                                 "disagrees with the plan: convert the shard again")
    groups = split_tensors(infos, split_max_size)
    paths = shard_paths(out, len(groups))
    handles: dict[Path, object] = {}
    try:
        # every file under a temporary name until all are complete
        with contextlib.ExitStack() as outputs:
            tmps = [outputs.enter_context(atomic_output(p)) for p in paths]
            for i, (group, tmp) in enumerate(zip(groups, tmps)):
                if len(groups) == 1:
                    kvs = list(plan.kvs)
                elif i == 0:
                    kvs = list(plan.kvs) + split_kvs(i, len(groups), len(infos))
                else:
                    kvs = split_kvs(i, len(groups), len(infos))
                with open(tmp, "wb") as fh:
                    w = GGUFFileWriter(fh, kvs, group)
                    w.write_header()
                    for ti in group:
                        part, t = where[ti.name]
                        src = handles.get(part)
                        if src is None:
                            src = handles[part] = open(part, "rb")
                        w.begin_tensor(ti.name)
                        src.seek(t["offset"])
                        h = hashlib.sha256()
                        left = t["nbytes"]
                        while left:
                            chunk = src.read(min(COPY_CHUNK, left))
                            if not chunk:
                                raise GGUFWriteError(f"part {part} ends inside tensor {ti.name!r}")
                            h.update(chunk)
                            w.write(chunk)
                            left -= len(chunk)
                        if h.hexdigest() != t["sha256"]:
                            raise GGUFWriteError(f"tensor {ti.name!r} in part {part}: sha256 mismatch; the "
                                                 "part is corrupt: convert that shard again")
                    w.finish()
    finally:
        for fh in handles.values():
            fh.close()
    return paths
