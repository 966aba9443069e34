"""Fan-out: the same release on one Ray node and on two (one CPU each), on this machine.

    sudo .venv/bin/python bench/fanout.py [--models 31B 26B-A4B] [--workdir /var/tmp/qatgguf-fanout]

Each node has its own private scratch folder (tests/flows/cluster.py); the sources are the
built-in tiny family, uploaded to a store folder both nodes read (as S3 would be), so the
two runs do the same work from an empty store. Prints both wall times, the speed-up, the
per-task seconds by kind, and the model of the speed-up on N nodes (bench/RESULTS.md,
"Fan-out").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "flows")]

KINDS = ("source", "plan", "quantize", "assemble", "mmproj", "base-records", "evaluate", "merge-eval", "gate", "publish")


def _kind(task: str) -> str:
    return next(k for k in KINDS if task.startswith(k))


# The flow's own fixed cost: process start, imports, the Prefect run, Ray's connection and
# the manifest (tests/flows/test_nightly.py: a nightly run with nothing to do takes about 3 s).
FLOW_FIXED_S = 3.0
_AFTER = {  # a task of this kind starts when every task of those kinds of its model is done
    "plan": ("source",), "quantize": ("plan",), "assemble": ("quantize",), "mmproj": ("plan",),
    "base-records": ("assemble",), "evaluate": ("assemble", "base-records"), "merge-eval": ("evaluate",),
    "gate": ("merge-eval",), "publish": ("gate", "mmproj"),
}


def task_graph(result: dict) -> dict[str, tuple[float, list[str]]]:
    """task -> (its measured seconds, the tasks it waits for), from a release's summary."""
    graph: dict[str, tuple[float, list[str]]] = {}
    for s in result["models"].values():
        tasks = [t for t in s["tasks"] if t["state"] == "completed"]
        for t in tasks:
            kind = _kind(t["task"])
            deps = [u["task"] for u in tasks if _kind(u["task"]) in _AFTER.get(kind, ())]
            graph[t["task"]] = (float(t.get("seconds") or 0.0), deps)
    return graph


def schedule(graph: dict[str, tuple[float, list[str]]], nodes: int, per_task: float) -> float:
    """Wall time of the graph on `nodes` one-CPU nodes: list scheduling, a task starting on
    the first free node once its dependencies are done, each costing its seconds plus the
    per-task cost."""
    import heapq

    done: dict[str, float] = {}
    free = [0.0] * nodes
    pending = dict(graph)
    while pending:
        ready = [(max([done[d] for d in deps], default=0.0), name) for name, (_, deps) in pending.items()
                 if all(d in done for d in deps)]
        start_at, name = min(ready)
        node_free = heapq.heappop(free)
        end = max(start_at, node_free) + pending.pop(name)[0] + per_task
        done[name] = end
        heapq.heappush(free, end)
    return max(done.values(), default=0.0)


def run(n_nodes: int, work: Path, cfg: Path, api_url: str) -> tuple[float, dict]:
    from cluster import BIN, start_nodes, stop_nodes

    shutil.rmtree(work / "store", ignore_errors=True)
    shutil.rmtree(work / "hub", ignore_errors=True)
    nodes = start_nodes(work / f"nodes{n_nodes}", n=n_nodes, env={}, memory=8_000_000_000)
    try:
        t0 = time.monotonic()
        p = nodes.head.run([str(BIN / "qatgguf"), "release", str(cfg), "--json"],
                           env=nodes.driver_env(PREFECT_API_URL=api_url), capture_output=True, text=True, cwd=work)
        wall = time.monotonic() - t0
    finally:
        stop_nodes(nodes)
    out = p.stdout
    if "\n{\n" not in "\n" + out:
        raise SystemExit(f"{n_nodes} node(s): no summary\n{p.stderr[-3000:]}")
    result = json.loads(out[("\n" + out).rindex("\n{\n"):])
    if result["state"] != "Completed":
        raise SystemExit(f"{n_nodes} node(s): {result.get('message')}\n{p.stderr[-2000:]}")
    return wall, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/var/tmp/qatgguf-fanout")
    ap.add_argument("--models", nargs="+", default=["31B", "26B-A4B"])
    args = ap.parse_args()
    import yaml

    from cluster import prefect_server

    from qatgguf.config import builtin_config_path
    from qatgguf.fixtures import build_family
    from qatgguf.paths import cache_root

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    family = build_family(cache_root() / "fixtures", models=args.models)
    raw = yaml.safe_load(builtin_config_path("tiny-family").read_text())
    raw["models"] = [{**m, "source": str(family[m["name"]]), "variants": []}
                     for m in raw["models"] if m["name"] in args.models]
    raw["store"] = {"url": str(work / "store")}
    raw["publish"] = {"target": "local", "local_root": str(work / "hub")}
    raw["ray"] = {"address": "auto"}
    cfg = work / "fanout.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    walls, results = {}, {}
    with prefect_server(work / "prefect") as server:
        for n in (1, 2):
            walls[n], results[n] = run(n, work, cfg, server.url)
            print(f"{n} node(s): {walls[n]:.1f} s")
    by_kind: dict[str, float] = {}
    for s in results[2]["models"].values():
        for t in s["tasks"]:
            if t.get("seconds") is not None:
                by_kind[_kind(t["task"])] = by_kind.get(_kind(t["task"]), 0.0) + t["seconds"]
    busy = sum(by_kind.values())
    speedup = walls[1] / walls[2]
    graph = task_graph(results[1])
    n_tasks = len(graph)
    # one node with one CPU runs the tasks one after another: what the wall time holds
    # beyond the tasks' own seconds is the flow's fixed cost plus a cost per task (Ray
    # worker, Prefect state calls); the nightly's no-op run measures the fixed part
    per_task = max(0.0, (walls[1] - FLOW_FIXED_S - sum(d for d, _ in graph.values())) / n_tasks)
    modelled = {n: round(FLOW_FIXED_S + schedule(graph, n, per_task), 1) for n in (1, 2, 4, 8, 16)}
    report = {"models": args.models, "wall_1_node_s": round(walls[1], 1), "wall_2_nodes_s": round(walls[2], 1),
              "speedup": round(speedup, 2), "task_seconds_by_kind": {k: round(v, 1) for k, v in by_kind.items()},
              "task_seconds": round(busy, 1), "tasks": n_tasks, "cost_per_task_s": round(per_task, 2),
              "flow_fixed_s": FLOW_FIXED_S, "modelled_wall_s": modelled,
              "modelled_speedup": {n: round(modelled[1] / w, 2) for n, w in modelled.items()}}
    (work / "fanout.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
