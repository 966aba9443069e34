"""`qatgguf lattice SRC [--gguf FILE ...] [--json]`: per tensor of a checkpoint, the share
of blocks on each QAT grid (Q4_0, TQ2_0, Q8_0), the grid detection chooses and its
signature; with `--gguf`, the block exactness of GGUF files converted from SRC (the
share of 32-value blocks of their quantized tensors that give back the checkpoint's
values)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lattice",
        help="report the QAT grid of each tensor of a safetensors checkpoint",
        description=__doc__,
    )
    p.add_argument("src", help="checkpoint directory (or one .safetensors file)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--min-elements",
        type=int,
        default=256,
        help="skip tensors smaller than this (norms, scalars)",
    )
    p.add_argument(
        "--gguf",
        type=Path,
        action="append",
        default=[],
        help="a GGUF file converted from SRC: report its block exactness (repeatable)",
    )
    p.set_defaults(run=run)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def run(args: argparse.Namespace) -> int:
    from qatgguf.convert.grid_report import lattice_report, report_as_dicts

    reports = lattice_report(args.src, min_elements=args.min_elements)
    exactness = []
    if args.gguf:
        from qatgguf.convert.exactness import gguf_exactness

        exactness = [gguf_exactness(g, args.src) for g in args.gguf]
    grid_blocks = sum(r.q4_blocks for r in reports if r.grid == "Q4_0")
    grid_blocks += sum(r.tq2_blocks for r in reports if r.grid == "TQ2_0")
    grid_blocks += sum(r.q8_blocks for r in reports if r.grid == "Q8_0")
    if args.json:
        out: dict[str, object] | list[dict[str, object]] = report_as_dicts(reports)
        if exactness:
            out = {"tensors": out, "gguf": [e.to_dict() for e in exactness]}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max([len(r.tensor) for r in reports] + [6])
    print(
        f"{'tensor':<{width}}  {'Q4_0 grid':>9}  {'TQ2_0 grid':>10}  {'Q8_0 grid':>9}  {'grid':>5}  "
        f"{'scales':>6}  max code -> share; recipe"
    )
    for r in reports:
        sig = r.signature
        shares = ", ".join(f"{c}:{v:.2f}" for c, v in dict(sig["max_code_shares"]).items()) or "-"
        tq2 = f"{r.tq2_fraction:10.4f}" if r.tq2_blocks else f"{'-':>10}"
        q8 = f"{r.q8_fraction:9.4f}" if r.q8_blocks else f"{'-':>9}"
        print(
            f"{r.tensor:<{width}}  {r.q4_fraction:9.4f}  {tq2}  {q8}  {r.grid or '-':>5}  "
            f"{sig['scale_rounding']:>6}  {shares}; {sig['recipe']}"
        )
    if not reports:
        print("no float tensor large enough to scan", file=sys.stderr)
    else:
        on = sum(1 for r in reports if r.grid)
        print(f"tensors on a grid: {on} of {len(reports)}")
    for e in exactness:
        types = ", ".join(f"{t} {_pct(x / b if b else 0)} of {b}" for t, (x, b) in e.by_type().items())
        print(
            f"block exactness of {e.gguf}: {e.exact} of {e.blocks} blocks ({_pct(e.fraction)}); "
            f"{types or 'no quantized tensor'}"
        )
    return 0
