"""`qatgguf lattice SRC [--json]`: per tensor of a checkpoint, the share of blocks on a QAT
grid and the recipe signature (which code the block maximum takes, the scale rounding)."""

from __future__ import annotations

import argparse
import json
import sys


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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qatgguf.quant.lattice import lattice_report, report_as_dicts

    reports = lattice_report(args.src, min_elements=args.min_elements)
    if args.json:
        json.dump(report_as_dicts(reports), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max([len(r.tensor) for r in reports] + [6])
    print(
        f"{'tensor':<{width}}  {'Q4_0 grid':>9}  {'TQ2_0 grid':>10}  {'scales':>6}  max code -> share; recipe"
    )
    for r in reports:
        sig = r.signature
        shares = ", ".join(f"{c}:{v:.2f}" for c, v in dict(sig["max_code_shares"]).items()) or "-"
        tq2 = f"{r.tq2_fraction:10.4f}" if r.tq2_blocks else f"{'-':>10}"
        print(
            f"{r.tensor:<{width}}  {r.q4_fraction:9.4f}{'':2}{tq2}  {sig['scale_rounding']:>6}  {shares}; {sig['recipe']}"
        )
    if not reports:
        print("no float tensor large enough to scan", file=sys.stderr)
    return 0
