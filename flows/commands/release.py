"""`qatgguf release CONFIG`: run the release flow on the configured Prefect server and Ray.

With no server configured, a local Prefect server (SQLite) is started in the background
and left running so the runs can be watched in its UI afterwards."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "release",
        help="release a model family (convert, quantize, evaluate, gate, publish)",
        description="Run the release flow for CONFIG (a YAML path or a built-in name: tiny-family, gemma-4-qat). "
                    "Finished steps are found in the store by content and not redone.",
    )
    p.add_argument("config", help="release config: a YAML file or a built-in name")
    p.add_argument("--models", nargs="+", help="only these models of the family")
    p.add_argument("--recipes", nargs="+", help="only these recipes (the base recipe always runs)")
    p.add_argument("--release-id", help="use this release id instead of a new one")
    p.add_argument("--resume", metavar="RELEASE_ID", help="continue this release (same config and selection)")
    p.add_argument("--json", action="store_true", help="print the release summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the core's log lines go to each task's log in the Prefect UI
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "qatgguf")
    from qatgguf.flows.release import load_config, run_release

    cfg = load_config(args.config)  # validate before starting anything
    api_url, release_id, state = run_release(
        args.config, models=args.models, recipes=args.recipes, release_id=args.resume or args.release_id,
        resume=bool(args.resume),
    )
    ui = api_url.removesuffix("/api")
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    if not isinstance(result, dict):
        result = _from_manifest(cfg, release_id)
    if args.json:
        print(json.dumps({**(result or {}), "state": state.name, "message": state.message}, indent=2, default=str))
        return 0 if state.is_completed() and not (result or {}).get("gate_failed") else 1

    print()
    print(f"Release {release_id} of {cfg.family}: {state.name}")
    if result and result.get("rows"):
        from qatgguf.release import format_release_rows

        print(format_release_rows(result["rows"]), end="")
    for table in (result or {}).get("tables", []):
        print()
        print(f"{table['title']}:")
        print(table["markdown"], end="")
    print()
    print(f"Prefect UI:      {ui}  (flow runs: {ui}/runs)")
    print(f"Release folder:  {_store_path(cfg.store.url)}/releases/{cfg.family}/{release_id}")
    if result:
        print(f"Manifest:        {result['manifest']}")
        for name, s in result["models"].items():
            if s["status"] == "failed":
                where = f"FAILED: {s['error']}"
            elif s["status"] == "published":
                where = _hub_path(cfg, s["repo"]) + (f" (with {s['model']})" if s.get("model", name) != name else "")
            else:
                where = "NOT PUBLISHED (gate failed)"
            print(f"Published {name:<8} {where}")
    if not state.is_completed():
        print(f"Release failed: {state.message}", file=sys.stderr)
        print(f"Continue it with: qatgguf release {args.config} --resume {release_id}", file=sys.stderr)
        return 1
    if result and result["gate_failed"]:
        print(f"Gate failed, not published: {', '.join(result['gate_failed'])}")
        return 1
    return 0


def _from_manifest(cfg, release_id: str) -> dict | None:
    """The summary of a failed release, from its manifest (always written)."""
    from qatgguf.errors import StoreError
    from qatgguf.release import release_result
    from qatgguf.store import open_store

    store = open_store(cfg.resolved(Path.cwd()).store.url, endpoint_url=cfg.store.endpoint_url)
    key = f"releases/{cfg.family}/{release_id}/manifest.json"
    try:
        ref = store.stat(key)
        if ref is None:
            return None
        manifest = store.get_json(ref.uri)
    except StoreError:
        return None
    return release_result(cfg.resolved(Path.cwd()), release_id=release_id, manifest_uri=ref.uri,
                          summary=manifest["models"])


def _store_path(url: str) -> str:
    if url.startswith("s3://"):
        return url
    return str(Path(url.removeprefix("file://")).resolve())


def _hub_path(cfg, repo: str) -> str:
    if cfg.publish.target == "local":
        return str(Path(cfg.publish.local_root).resolve() / repo)
    return f"{cfg.publish.endpoint or 'https://huggingface.co'}/{repo}"
