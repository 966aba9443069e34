"""The `qatgguf` command. Each subcommand lives in `qatgguf.commands.<name>` and defines
`add_parser(subparsers)` and `run(args) -> int`; subcommands import their heavy
dependencies only when they run."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qatgguf import __version__
from qatgguf.errors import QatGgufError

# (subcommand, module under qatgguf.commands)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("fixtures", "fixtures"),
    ("convert", "convert"),
    ("eval", "eval"),
    ("lattice", "lattice"),
    ("release", "release"),
    ("nightly", "nightly"),
    ("gc", "gc"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatgguf",
        description="QAT checkpoints to GGUF files that run in llama.cpp: convert, quantize, evaluate, release.",
    )
    parser.add_argument("--version", action="version", version=f"qatgguf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, module in COMMANDS:
        mod = importlib.import_module(f"qatgguf.commands.{module}")
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Every HTTP request of the Prefect and Hub clients is logged at INFO otherwise.
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except QatGgufError as exc:
        print(f"qatgguf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
