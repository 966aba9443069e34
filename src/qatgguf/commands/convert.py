"""`qatgguf convert SRC -o OUT.gguf --recipe NAME [--split-max-size 50M] [--mmproj [--mmproj-type bf16]]`."""

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
    p.add_argument("--threads", type=int, default=None,
                   help="threads that quantize a tensor's rows (default: OMP_NUM_THREADS, else every CPU)")
    p.add_argument("--plan-only", action="store_true", help="print the plan as JSON and stop")
    p.add_argument("--mmproj", action="store_true",
                   help="also write the vision projector as mmproj-<TYPE>.gguf next to OUT")
    p.add_argument("--mmproj-type", default="bf16", choices=["bf16", "f16"],
                   help="type of the projector's weight matrices (llama.cpp keeps them in BF16 or F16)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qatgguf.convert import convert, plan_conversion
    from qatgguf.gguf.writer import parse_size

    if args.plan_only:
        print(plan_conversion(args.src, recipe=args.recipe).to_json())
        return 0
    split = parse_size(args.split_max_size) if args.split_max_size else None
    mm_plan = None
    if args.mmproj:
        from qatgguf.convert.mmproj import plan_mmproj

        # planned before the text conversion, so a checkpoint without a tower fails fast
        mm_plan = plan_mmproj(args.src, outtype=args.mmproj_type)
        if mm_plan is None:
            from qatgguf.errors import CheckpointError

            raise CheckpointError("--mmproj: the checkpoint has no vision tower, so there is no projector to "
                                  "write: drop --mmproj for a text-only model", file=str(args.src))
    paths = convert(args.src, args.out, recipe=args.recipe, split_max_size=split, workdir=args.workdir,
                    threads=args.threads)
    if mm_plan is not None:
        from qatgguf.convert.mmproj import mmproj_filename, write_mmproj_plan

        paths.append(write_mmproj_plan(mm_plan, Path(args.out).parent / mmproj_filename(args.mmproj_type)))
    for p in paths:
        log.info("wrote %s (%d bytes)", p, p.stat().st_size)
        print(p)
    return 0
