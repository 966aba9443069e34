"""`qatgguf release CONFIG`: run the release flow on the configured Prefect server and Ray.

With no server configured, a local Prefect server (SQLite) is started in the background
and left running so the runs can be watched in its UI afterwards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "release",
        help="release a model family (convert, quantize, evaluate, gate, publish)",
        description="Run the release flow for CONFIG (a YAML path or a built-in name: tiny-family, gemma-4-qat).",
    )
    p.add_argument("config", help="release config: a YAML file or a built-in name")
    p.add_argument("--models", nargs="+", help="only these models of the family")
    p.add_argument("--recipes", nargs="+", help="only these recipes (the base recipe always runs)")
    p.add_argument("--release-id", help="use this release id instead of a new one")
    p.add_argument("--json", action="store_true", help="print the release summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flows.release import load_config, run_release

    cfg = load_config(args.config)  # validate before starting anything
    api_url, result = run_release(
        args.config, models=args.models, recipes=args.recipes, release_id=args.release_id
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 1 if result["gate_failed"] else 0

    ui = api_url.removesuffix("/api")
    print()
    print(f"Release {result['release_id']} of {cfg.family}")
    print(f"{'model':<10} {'method':<12} {'size MB':>9} {'mean KLD':>10} {'99.9% KLD':>10} {'top-1 %':>8} {'PPL':>9}  gate")
    for r in result["rows"]:
        print(
            f"{r['model']:<10} {r['method']:<12} {r['size_MB']:>9.3f} {r['mean_KLD']:>10.5f} {r['KLD_99.9%']:>10.4f}"
            f" {r['top1_%']:>8.2f} {r['PPL']:>9.3f}  {r['gate']}"
        )
    print()
    print(f"Prefect UI:      {ui}  (flow runs: {ui}/runs)")
    print(f"Release folder:  {_store_path(cfg.store.url)}/releases/{cfg.family}/{result['release_id']}")
    print(f"Manifest:        {result['manifest']}")
    for name, s in result["models"].items():
        pub = s["published"]
        where = _hub_path(cfg, pub["repo"]) if pub["published"] else "NOT PUBLISHED (gate failed)"
        print(f"Published {name:<8} {where}")
    if result["gate_failed"]:
        print(f"Gate failed, not published: {', '.join(result['gate_failed'])}")
        return 1
    return 0


def _store_path(url: str) -> str:
    if url.startswith("s3://"):
        return url
    return str(Path(url.removeprefix("file://")).resolve())


def _hub_path(cfg, repo: str) -> str:
    if cfg.publish.target == "local":
        return str(Path(cfg.publish.local_root).resolve() / repo)
    return f"{cfg.publish.endpoint or 'https://huggingface.co'}/{repo}"
