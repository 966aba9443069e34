"""The `qatgguf` command. Each subcommand is a module that defines `add_parser(subparsers)`
(which sets `run(args) -> int` as the parser's default); subcommands import their heavy
dependencies only when they run. The core's subcommands live in `qatgguf.commands.<name>`;
others (the release and nightly commands of the orchestration package) are found through
the `qatgguf.commands` entry-point group, so the core never imports them itself."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from qatgguf import __version__
from qatgguf.errors import QatGgufError

# (subcommand, module under qatgguf.commands)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("fixtures", "fixtures"),
    ("convert", "convert"),
    ("eval", "eval"),
    ("lattice", "lattice"),
    ("gc", "gc"),
)
ENTRY_POINT_GROUP = "qatgguf.commands"


def plugin_commands() -> list[tuple[str, str]]:
    """(subcommand, module) of every subcommand registered in the `qatgguf.commands`
    entry-point group, in name order."""
    return sorted((ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatgguf",
        description="QAT checkpoints to GGUF files that run in llama.cpp: convert, quantize, evaluate, release.",
    )
    parser.add_argument("--version", action="version", version=f"qatgguf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [f"qatgguf.commands.{module}" for _name, module in COMMANDS]
    core = {name for name, _module in COMMANDS}
    modules += [module for name, module in plugin_commands() if name not in core]
    for module in modules:
        importlib.import_module(module).add_parser(sub)
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
