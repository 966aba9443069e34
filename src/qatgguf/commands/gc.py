"""`qatgguf gc CONFIG`: remove store content the last N releases do not use, and sweep
what killed tasks left (unfinished uploads, temporary files, scratch folders)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gc",
        help="remove store content that the last N releases do not use",
        description="Keep, per family in CONFIG's store, the releases with the newest N manifests (the config's "
                    "`retention`, or --keep) and everything they use; remove the rest, abort unfinished "
                    "uploads, remove temporary files and this machine's stale scratch folders.",
    )
    p.add_argument("config", help="release config: a YAML file or a built-in name (its store is cleaned)")
    p.add_argument("--keep", type=int, help="releases to keep per family (default: the config's retention)")
    p.add_argument("--grace-hours", type=float, default=24.0,
                   help="never remove anything younger than this (a release may be running)")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qatgguf.config import builtin_config_path, load_release_config
    from qatgguf.retention import collect_garbage
    from qatgguf.store import open_store

    p = Path(args.config)
    cfg = load_release_config(p if p.suffix in (".yaml", ".yml") or p.exists() else builtin_config_path(args.config))
    cfg = cfg.resolved(Path.cwd())
    store = open_store(cfg.store.url, endpoint_url=cfg.store.endpoint_url)
    report = collect_garbage(store, keep=args.keep or cfg.retention, grace=args.grace_hours * 3600,
                             dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"{cfg.store.url}: kept {report.kept_objects} objects ({report.kept_bytes / 1e6:.1f} MB) used by "
          f"{sum(len(v) for v in report.kept_releases.values())} releases; {verb} {report.removed_objects} objects "
          f"({report.removed_bytes / 1e6:.1f} MB) and {len(report.removed_releases)} releases; "
          f"{report.aborted_uploads} unfinished uploads, {report.swept_temp} temporary files, "
          f"{report.swept_scratch} scratch folders")
    return 0
