"""Block exactness of a GGUF file against the checkpoint it was made from: which blocks of
its quantized tensors give back the checkpoint's values.

A block is 32 consecutive row elements (whatever the tensor's type, so files of different
types compare block for block); it is exact when the bf16 rounding of the file's decoded
values equals the checkpoint's bf16 values, i.e. the file holds the very grid the model
was trained on (a QAT export stores `bf16(d * q)`). Tensors the file keeps in F32, F16 or
BF16 are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qatgguf.errors import CheckpointError

BLOCK = 32
_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorExactness:
    tensor: str  # GGUF name
    qtype: str
    exact: int
    blocks: int

    @property
    def fraction(self) -> float:
        return self.exact / self.blocks if self.blocks else 0.0


@dataclass(frozen=True)
class GGUFExactness:
    """Exact blocks of every quantized tensor of one GGUF file."""

    gguf: str
    tensors: tuple[TensorExactness, ...]

    @property
    def exact(self) -> int:
        return sum(t.exact for t in self.tensors)

    @property
    def blocks(self) -> int:
        return sum(t.blocks for t in self.tensors)

    @property
    def fraction(self) -> float:
        return self.exact / self.blocks if self.blocks else 0.0

    def by_type(self) -> dict[str, tuple[int, int]]:
        """{GGML type: (exact, blocks)}."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            e, b = out.get(t.qtype, (0, 0))
            out[t.qtype] = (e + t.exact, b + t.blocks)
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "gguf": self.gguf,
            "exact": self.exact,
            "blocks": self.blocks,
            "fraction": self.fraction,
            "by_type": {k: {"exact": e, "blocks": b} for k, (e, b) in self.by_type().items()},
            "tensors": [asdict(t) for t in self.tensors],
        }


def gguf_exactness(gguf_path: str | Path, src: str | Path) -> GGUFExactness:
    """Compare every quantized tensor of the GGUF file `gguf_path` (one file, not split)
    with the checkpoint `src` it was converted from, block by block.

    Names are mapped as the converter maps them (`plan_conversion`), embeddings trimmed to
    the same rows. Raises CheckpointError when a tensor of the file has no source tensor of
    the same size in the checkpoint (a file of another model)."""
    from gguf import GGUFReader

    from qatgguf.convert.plan import plan_conversion
    from qatgguf.convert.safetensors import DTYPES, read_header, to_f32
    from qatgguf.quant.lattice import block_exactness

    plan = plan_conversion(src, recipe="bf16", hash_local=False)
    root = plan.source.local_dir
    if root is None:
        raise CheckpointError("compare with a local checkpoint folder (download it first)", file=str(src))
    jobs = plan.tensors
    files = {j.gguf_name: sj.file for sj in plan.shards for j in sj.tensors}
    headers: dict[str, object] = {}
    reader = GGUFReader(str(gguf_path))
    out: list[TensorExactness] = []
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype in _FLOAT_TYPES:
            continue
        job = jobs.get(t.name)
        if job is None or job.hf_name is None or files.get(t.name) is None:
            raise CheckpointError(
                f"the GGUF tensor {t.name!r} has no source tensor in this checkpoint; compare a file "
                "with the checkpoint it was converted from", file=str(gguf_path), tensor=t.name)
        shard = root / str(files[t.name])
        header = headers.setdefault(str(shard), read_header(shard))
        entry = header.tensors[job.hf_name]  # type: ignore[attr-defined]
        n = int(np.prod(job.shape))
        if int(t.n_elements) != n:
            raise CheckpointError(
                f"the GGUF tensor {t.name!r} has {int(t.n_elements)} values, the checkpoint's "
                f"{job.hf_name!r} {n}; compare a file with the checkpoint it was converted from",
                file=str(gguf_path), tensor=t.name)
        item, np_dtype = DTYPES[entry.dtype]
        raw = np.memmap(shard, dtype=np.uint8, mode="r", offset=entry.begin, shape=(n * item,))
        w = to_f32(raw.view(np_dtype).reshape(-1, job.shape[-1]), entry.dtype)
        data = np.asarray(t.data).reshape(w.shape[0], -1)
        exact, blocks = block_exactness(w, data, qtype, block=BLOCK)
        out.append(TensorExactness(t.name, qtype, exact, blocks))
    return GGUFExactness(str(gguf_path), tuple(out))
