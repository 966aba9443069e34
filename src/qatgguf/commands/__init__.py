"""Subcommands of the `qatgguf` CLI: each module has `add_parser(sub)`; the parser it
adds sets `run=` to a function taking the parsed args and returning an exit code."""
