"""`qatgguf nightly CONFIG`: release only the models whose inputs changed since their last
published release (the nightly deployment's flow, run once from the command line)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nightly",
        help="release what changed upstream since the last release (nothing when nothing did)",
        description="Resolve each model's source revision and compare it, the recipes and the tool versions "
                    "with the family's last published release; release only the models that changed.",
    )
    p.add_argument("config", help="release config: a YAML file or a built-in name")
    p.add_argument("--models", nargs="+", help="only these models of the family")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "qatgguf")
    from qatgguf.flows.nightly import run_nightly

    api_url, state = run_nightly(args.config, models=args.models)
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    summary = {**(result if isinstance(result, dict) else {}), "state": state.name, "message": state.message}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif result and result.get("unchanged"):
        print(f"Unchanged since release {', '.join(result['since'])}: nothing to do.")
    else:
        print(f"Nightly: {state.name}. {state.message or ''}")
        if result:
            print(f"Released {', '.join(result.get('changed', []))} as {result.get('release_id')}; "
                  f"manifest {result.get('manifest')}")
    print(f"Prefect UI: {api_url.removesuffix('/api')}", file=sys.stderr)
    return 0 if state.is_completed() else 1
