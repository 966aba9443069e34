"""`qatgguf convert SRC -o OUT.gguf --recipe NAME [--split-max-size 50M]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a safetensors checkpoint to GGUF",
                       description="Convert a Gemma checkpoint directory to GGUF (plan, shards, assemble).")
    p.add_argument("src", help="checkpoint: a directory, hf://org/repo@rev or s3://bucket/prefix")
    p.add_argument("-o", "--out", required=True, type=Path, help="output .gguf path")
    p.add_argument("--recipe", default="bf16", help="type recipe: f32, bf16, f16, q8_0, q4_0, ...")
    p.add_argument("--split-max-size", default=None,
                   help="split the output into files of at most this size (e.g. 50M, 2G)")
    p.add_argument("--workdir", type=Path, default=None, help="keep part files here")
    p.add_argument("--plan-only", action="store_true", help="print the plan as JSON and stop")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qatgguf.convert import convert, plan_conversion
    from qatgguf.gguf.writer import parse_size

    if args.plan_only:
        print(plan_conversion(args.src, recipe=args.recipe).to_json())
        return 0
    split = parse_size(args.split_max_size) if args.split_max_size else None
    paths = convert(args.src, args.out, recipe=args.recipe, split_max_size=split, workdir=args.workdir)
    for p in paths:
        log.info("wrote %s (%d bytes)", p, p.stat().st_size)
        print(p)
    return 0
