"""The `qatgguf lattice` report: every float tensor of a safetensors checkpoint scanned for
QAT grids (read through `convert.safetensors`, scanned by `quant.lattice`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from qatgguf.convert.safetensors import open_tensor, read_header, to_f32
from qatgguf.errors import CheckpointError
from qatgguf.quant.grid_signature import grid_signature
from qatgguf.quant.lattice import MIN_GRID_SHARE, GridStats, scan_grid

# the float types the grid scan reads
SCANNED_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class TensorGridReport:
    """One tensor of a checkpoint: how much of it sits on a 4-bit (Q4_0), 2-bit (TQ2_0)
    and 8-bit (Q8_0) grid, the grid detection chooses (`grid`, None: none) and the
    signature of that grid (of the 4-bit scan when there is none)."""

    file: str
    tensor: str
    shape: tuple[int, ...]
    dtype: str
    q4_blocks: int
    q4_fraction: float
    tq2_blocks: int
    tq2_fraction: float
    signature: dict[str, object]
    q8_blocks: int = 0
    q8_fraction: float = 0.0
    grid: str | None = None


def lattice_report(src_dir: str | Path, *, min_elements: int = 256) -> list[TensorGridReport]:
    """Scan every float tensor of a safetensors checkpoint (a dir or one file), tensor by
    tensor, for QAT grids, and name the grid detection chooses (as `detect_grid`: the
    coarsest of TQ2_0, Q4_0, Q8_0 holding >= MIN_GRID_SHARE of the blocks). Tensors with
    fewer than `min_elements` or a last dimension that is not a multiple of 32 are skipped
    (norms, biases, scalars).

    Raises CheckpointError naming the file (and tensor) on unreadable input.
    """
    src = Path(src_dir)
    files = sorted(src.glob("*.safetensors")) if src.is_dir() else [src]
    if not files:
        raise CheckpointError(
            "no *.safetensors files. Fix: point at a checkpoint directory", file=str(src)
        )
    out: list[TensorGridReport] = []
    for path in files:
        header = read_header(path)
        for name in sorted(header.tensors):
            entry = header.tensors[name]
            shape = entry.shape
            if entry.dtype not in SCANNED_DTYPES or not shape or int(np.prod(shape)) < min_elements:
                continue
            if shape[-1] % 32:
                continue
            x = to_f32(open_tensor(path, entry), entry.dtype)
            q4 = scan_grid(x, T.Q4_0)
            tq2 = scan_grid(x, T.TQ2_0) if shape[-1] % 256 == 0 else GridStats()
            # the 8-bit scan only where no coarser grid fits (every 4-bit grid is one)
            if max(q4.fraction, tq2.fraction) >= MIN_GRID_SHARE:
                q8 = GridStats()
            else:
                q8 = scan_grid(x, T.Q8_0)
            grid, stats = None, q4
            for t, st in ((T.TQ2_0, tq2), (T.Q4_0, q4), (T.Q8_0, q8)):
                if st.blocks and st.fraction >= MIN_GRID_SHARE:
                    grid, stats = t, st
                    break
            out.append(
                TensorGridReport(
                    file=path.name,
                    tensor=name,
                    shape=shape,
                    dtype=entry.dtype,
                    q4_blocks=q4.blocks,
                    q4_fraction=q4.fraction,
                    tq2_blocks=tq2.blocks,
                    tq2_fraction=tq2.fraction,
                    signature=grid_signature(stats, grid or T.Q4_0),
                    q8_blocks=q8.blocks,
                    q8_fraction=q8.fraction,
                    grid=None if grid is None else grid.name,
                )
            )
    return out


def report_as_dicts(reports: list[TensorGridReport]) -> list[dict[str, object]]:
    return [asdict(r) | {"shape": list(r.shape)} for r in reports]
