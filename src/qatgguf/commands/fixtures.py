"""`qatgguf fixtures build --out DIR`: build (or reuse) the tiny Gemma 4 QAT family."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from qatgguf.fixtures.specs import FAMILY

    parser = sub.add_parser("fixtures", help="the built-in tiny Gemma 4 QAT family")
    actions = parser.add_subparsers(dest="fixtures_command", required=True)
    build = actions.add_parser(
        "build",
        help="build the tiny checkpoints into DIR/<model>/ (reused when already built)",
    )
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument(
        "--model",
        dest="models",
        action="append",
        choices=list(FAMILY),
        help="build only this model (repeatable); default: all (five sizes, two mobile mixtures)",
    )
    build.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    from qatgguf.fixtures import build_family, read_fixture_info

    paths = build_family(args.out, models=args.models)
    header = f"{'model':<10} {'params':>10} {'tensors':>7} {'shards':>6} {'vocab':>6} {'held-out PPL':>12} {'build s':>8}  path"
    print(header)
    for name, path in paths.items():
        info = read_fixture_info(path)
        print(
            f"{name:<10} {info.params:>10,} {info.tensors:>7} {info.shards:>6} {info.vocab_size:>6} "
            f"{info.heldout_ppl:>12.2f} {info.build_seconds:>8.1f}  {path}"
        )
    return 0
