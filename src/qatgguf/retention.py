"""Retention: what the store keeps, and sweeping what killed tasks leave behind.

Content-addressed outputs (`cas/...`) are shared by every release that computed the same
key, so an object may only go when no kept release refers to it. A release refers to an
output by its content key, which its manifest lists (plans, parts, files, projectors,
base records, ranges, evaluations, tiny sources). `collect_garbage` keeps, per family,
the releases with the newest N manifests (and unfinished releases younger than the grace
period, which `--resume` may still continue), and removes every other release folder and
every `cas/` object none of the kept manifests names. Objects younger than the grace
period are never removed: a release running now may have written them and not listed
them yet.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qatgguf.keys import CAS
from qatgguf.paths import cache_root

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"[0-9a-f]{64}")
DAY = 24 * 3600


@dataclass
class GcReport:
    kept_releases: dict[str, list[str]] = field(default_factory=dict)  # family -> release ids
    removed_releases: list[str] = field(default_factory=list)
    removed_objects: int = 0
    removed_bytes: int = 0
    kept_objects: int = 0
    kept_bytes: int = 0
    aborted_uploads: int = 0
    swept_temp: int = 0
    swept_scratch: int = 0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _releases(store) -> dict[str, dict[str, dict]]:
    """family -> release id -> {"manifest": dict | None, "started": time}."""
    out: dict[str, dict[str, dict]] = {}
    for obj in store.list_objects("releases/"):
        parts = obj.key.split("/")
        if len(parts) < 4:
            continue
        family, rid = parts[1], parts[2]
        entry = out.setdefault(family, {}).setdefault(rid, {"manifest": None, "modified": 0.0, "objects": []})
        entry["objects"].append(obj)
        entry["modified"] = max(entry["modified"], obj.modified or 0.0)
        if parts[3] == "manifest.json" and len(parts) == 4:
            entry["manifest"] = store.get_json(obj.key)
    return out


def collect_garbage(store, *, keep: int, grace: float = DAY, dry_run: bool = False, now: float | None = None
                    ) -> GcReport:
    """Remove what the newest `keep` releases of every family do not use (see the module
    doc). Returns what was kept and removed; with `dry_run` nothing is removed."""
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the newest release")
    now = time.time() if now is None else now
    report = GcReport()
    referenced: set[str] = set()
    for family, releases in _releases(store).items():
        finished = sorted((r for r, e in releases.items() if e["manifest"] is not None),
                          key=lambda r: (releases[r]["manifest"].get("finished", ""), r), reverse=True)
        kept = set(finished[:keep])
        kept |= {r for r, e in releases.items() if e["manifest"] is None and now - e["modified"] < grace}
        report.kept_releases[family] = sorted(kept)
        for rid, entry in releases.items():
            if rid in kept:
                referenced.update(_KEY_RE.findall(_text(store, entry["objects"])))
                continue
            report.removed_releases.append(f"{family}/{rid}")
            for obj in entry["objects"]:
                report.removed_objects += 1
                report.removed_bytes += obj.size
                if not dry_run:
                    store.delete(obj.key)
    for obj in store.list_objects(f"{CAS}/"):
        key = obj.key.split("/")[3] if obj.key.count("/") >= 3 else ""
        young = obj.modified is not None and now - obj.modified < grace
        if key in referenced or young:
            report.kept_objects += 1
            report.kept_bytes += obj.size
            continue
        report.removed_objects += 1
        report.removed_bytes += obj.size
        if not dry_run:
            store.delete(obj.key)
    report.aborted_uploads, report.swept_temp = _sweep_store(store, grace=grace, now=now, dry_run=dry_run)
    report.swept_scratch = sweep_scratch(grace=grace, now=now, dry_run=dry_run)
    log.info("gc: kept %d objects (%d bytes), removed %d objects (%d bytes) and %d releases", report.kept_objects,
             report.kept_bytes, report.removed_objects, report.removed_bytes, len(report.removed_releases))
    return report


def _text(store, objects) -> str:
    """The JSON records of a release (its manifest, gates, publish results) as one text:
    the content keys it used are the 64-hex strings in it."""
    return "\n".join(store.get_bytes(o.key).decode("utf-8", "replace") for o in objects if o.key.endswith(".json"))


def _sweep_store(store, *, grace: float, now: float, dry_run: bool) -> tuple[int, int]:
    """Abort multipart uploads and remove temporary files older than the grace period."""
    aborted = swept = 0
    uploads = getattr(store, "list_incomplete_uploads", None)
    if uploads is not None:
        for key, upload_id in uploads():
            aborted += 1
            if not dry_run:
                store.abort_upload(key, upload_id)
    temps = getattr(store, "temporary_files", None)
    if temps is not None:
        for p in temps():
            try:
                if now - p.stat().st_mtime >= grace:
                    swept += 1
                    if not dry_run:
                        p.unlink()
            except FileNotFoundError:
                continue
    return aborted, swept


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_scratch(*, grace: float = DAY, now: float | None = None, dry_run: bool = False,
                  root: Path | None = None) -> int:
    """Remove this machine's scratch folders (`<cache>/work/*`) left by killed tasks: older
    than the grace period, or holding a temporary file of a process that is gone."""
    now = time.time() if now is None else now
    work = (root or cache_root()) / "work"
    if not work.is_dir():
        return 0
    swept = 0
    for d in work.iterdir():
        try:
            old = now - d.stat().st_mtime >= grace
        except FileNotFoundError:
            continue
        pids = [int(m.group(1)) for f in (d.rglob("*") if d.is_dir() else [])
                if (m := re.search(r"\.tmp-?(\d+)$", f.name))]
        orphaned = bool(pids) and not any(_pid_alive(p) for p in pids)
        if old or orphaned:
            swept += 1
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    return swept
