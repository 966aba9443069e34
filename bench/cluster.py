"""A release of a checkpoint with the real 31B widths through the two-node cluster, and the
model of the real family on a bigger cluster built from what it measures.

    sudo .venv/bin/python bench/cluster.py [--workdir /var/tmp/qatgguf-cluster] [--layers 2]

What runs: a synthetic Gemma 4 checkpoint with 31B's widths (hidden 5376, FFN 21504, a
262,144-token vocabulary), a few layers, served by the Hub test server
(tests/servers/fakehub.py) over HTTP; two Ray nodes on this machine, each with a private
scratch folder (tests/flows/cluster.py); the release flow (`qatgguf release`) on the head,
the artifact store a folder both nodes reach (as S3 would be).

What it prints and writes (`<workdir>/cluster-measurements.json`):
- the bytes the plan read from the server, against the checkpoint's bytes (server side);
- per task: bytes fetched, declared memory, peak RSS, seconds, node;
- the model of the real five-size family on N nodes (bench/RESULTS.md "Cluster model").
Needs root (mount namespaces), about 25 GB of disk and 20-40 minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "flows"), str(ROOT / "bench")]

# The real family (the BF16 checkpoints' sizes on the Hub; Hub shards of at most 5 GB).
FAMILY_BF16_GB = {"E2B": 9.31, "E4B": 15.1, "12B": 23.8, "26B-A4B": 50.5, "31B": 61.4}
PARAMS_B = {"E2B": 5.1, "E4B": 8.0, "12B": 12.0, "26B-A4B": 25.2, "31B": 30.7}  # all weights, billions
ACTIVE_B = {"E2B": 2.3, "E4B": 4.5, "12B": 12.0, "26B-A4B": 4.0, "31B": 30.7}  # per token (MoE: active)
SHARD_GB = 5.0
RECIPES = ["UD-Q4_K_XL", "q4_0", "q8_0"]


def start_hub(storage: Path):
    from wsgiref.simple_server import make_server

    from servers.fakehub import FakeHub, _QuietHandler, _ThreadingServer

    hub = FakeHub(storage, token="hf_bench_token_0123456789")
    server = make_server("127.0.0.1", 0, hub, server_class=_ThreadingServer, handler_class=_QuietHandler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server


def measure(args) -> dict:
    # before huggingface_hub reads them at import: the Hub test server speaks plain LFS
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    from huggingface_hub import HfApi

    from cluster import BIN, prefect_server, start_nodes, stop_nodes
    from convert import build_checkpoint

    work = Path(args.workdir)
    ckpt = build_checkpoint(work / f"ckpt-31b-{args.layers}L", "31b", args.layers)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    shutil.rmtree(work / "hub", ignore_errors=True)
    hub, server = start_hub(work / "hub")
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("bench/gemma-4-31B-widths")
    t0 = time.monotonic()
    api.upload_folder(folder_path=str(ckpt), repo_id="bench/gemma-4-31B-widths")
    print(f"uploaded {ckpt_bytes / 1e9:.2f} GB to the Hub test server in {time.monotonic() - t0:.0f} s")

    # the plan alone, to count what it reads on the server side
    from qatgguf.convert.plan import plan_recipes
    from qatgguf.convert.source import SourceOptions, open_reader, snapshot

    hub.bytes_served.clear()
    opts = SourceOptions(hf_endpoint=hub.url, hf_token=hub.token)
    ref = snapshot("hf://bench/gemma-4-31B-widths@main", options=opts)
    t0 = time.monotonic()
    plan_recipes(ref, ["bf16", *RECIPES], reader=open_reader(ref, opts))
    plan_s = time.monotonic() - t0
    served = dict(hub.bytes_served)
    plan_bytes = sum(served.values())
    weights_read = sum(v for (_, f), v in served.items() if f.endswith(".safetensors"))
    print(f"plan: read {plan_bytes / 1e6:.2f} MB ({weights_read / 1e3:.0f} KB of it from shards) of a "
          f"{ckpt_bytes / 1e9:.2f} GB checkpoint = {100 * plan_bytes / ckpt_bytes:.3f}% in {plan_s:.1f} s")

    cfg = work / "release.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({
        "version": 1, "family": "bench-31b-widths", "license": "apache-2.0", "base_recipe": "bf16",
        "recipes": RECIPES,
        "gate": {"max_mean_kld": 100.0, "max_kld_99_9": 1000.0, "min_same_top_p": 0.0, "max_ppl_ratio": 100.0},
        "eval": {"ctx": 512, "chunks": args.chunks, "chunk_tasks": 2, "batch": 512},
        "store": {"url": str(work / "store")}, "sources": {"hf_endpoint": hub.url},
        "publish": {"target": "local", "local_root": str(work / "published")},
        "models": [{"name": "31B-widths", "source": "hf://bench/gemma-4-31B-widths@main",
                    "repo": "bench/gemma-4-31B-widths-GGUF", "file_prefix": "bench-31b"}],
    }))
    shutil.rmtree(work / "store", ignore_errors=True)
    shutil.rmtree(work / "nodes", ignore_errors=True)
    env = {"HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with prefect_server(work / "prefect") as ps:
        nodes = start_nodes(work / "nodes", n=2, env=env, memory=9_000_000_000, on_disk=True)
        try:
            t0 = time.monotonic()
            p = nodes.head.run([str(BIN / "qatgguf"), "release", str(cfg), "--json"],
                               env=nodes.driver_env(PREFECT_API_URL=ps.url), capture_output=True, text=True,
                               cwd=work, timeout=4 * 3600)
            wall = time.monotonic() - t0
        finally:
            stop_nodes(nodes)
    (work / "release.out").write_text(p.stdout)
    (work / "release.err").write_text(p.stderr)
    out = "\n" + p.stdout  # the summary is the last JSON object on stdout, maybe its first line
    if "\n{\n" not in out:
        raise SystemExit(f"release printed no summary (rc {p.returncode})\n{p.stderr[-3000:]}")
    result = json.loads(out[out.rindex("\n{\n"):])
    if result["state"] != "Completed":
        raise SystemExit(f"release failed: {result.get('message')}\n{p.stderr[-3000:]}")
    manifest = json.loads(Path(result["manifest"].removeprefix("file://")).read_text())
    tasks = manifest["models"]["31B-widths"]["tasks"]
    served_shards = {f: v for (_, f), v in hub.bytes_served.items() if f.endswith(".safetensors")}
    server.shutdown()
    return {"checkpoint_bytes": ckpt_bytes, "layers": args.layers, "plan_bytes": plan_bytes,
            "plan_shard_bytes": weights_read, "plan_seconds": plan_s, "release_wall_seconds": wall,
            "served_shard_bytes": served_shards, "chunks": args.chunks, "tasks": tasks}


def _eval_memory_gb() -> dict[str, float]:
    """What each size's base-records task declares (the BF16 file mapped, the real config's
    batch of 4 x 512 tokens of 262k-wide logits, llama.cpp's compute buffer): the largest
    single task of a release, placed whole on one node."""
    from qatgguf.resources import eval_budget

    return {n: round(eval_budget(gguf_bytes=int(gb * 1e9), n_ctx=512, n_seq=4, n_vocab=262144,
                                 records_bytes=0, chunks=100).memory / 1e9, 1) for n, gb in FAMILY_BF16_GB.items()}


def model(m: dict, *, nodes: int = 8, cores: int = 16, mem_gb: int = 64) -> dict:
    """Wall time, per-node peak memory and disk of the real family on `nodes` nodes,
    scaled from the measured per-task rates (one CPU each here)."""
    tasks = m["tasks"]
    shard = [t for t in tasks if t["task"].startswith("quantize-") and t.get("seconds") and not t.get("reused")]
    shard_rate = sum(t["fetched"] for t in shard) / sum(t["seconds"] for t in shard)  # source bytes/s per CPU
    asm = [t for t in tasks if t["task"].startswith("assemble-") and t.get("seconds")]
    asm_rate = sum(t["fetched"] for t in asm) / sum(t["seconds"] for t in asm)
    ev = [t for t in tasks if t["task"].startswith(("evaluate-", "base-records-")) and t.get("seconds")]
    # evaluation: the measured checkpoint's weights x tokens per CPU-second
    hidden, ff, vocab = 5376, 21504, 262144
    per_layer = 4 * hidden * hidden + 3 * hidden * ff
    params = m["layers"] * per_layer + vocab * hidden
    tokens = m["chunks"] * 512
    passes = len([t for t in ev if t["task"].startswith("evaluate-")]) / 2 + 1  # files (2 ranges each) + base
    eval_rate = params * tokens * passes / sum(t["seconds"] for t in ev)  # weight-tokens per CPU-second
    peak_shard = max(t["peak_rss"] for t in shard)
    declared_shard = max(t["declared"]["memory"] for t in shard)
    shard_cpus = 4
    slots = nodes * min(cores // shard_cpus, int(mem_gb * 1e9 * 0.9 // max(declared_shard, 1)))
    out: dict = {"nodes": nodes, "cores": cores, "mem_gb": mem_gb, "shard_rate_mb_s_per_cpu": shard_rate / 1e6,
                 "assemble_rate_mb_s": asm_rate / 1e6, "eval_rate_gweight_tokens_s_per_cpu": eval_rate / 1e9,
                 "peak_shard_rss_gb": peak_shard / 1e9, "declared_shard_gb": declared_shard / 1e9,
                 "shard_slots": slots}
    total_shards = 0
    convert_s = 0.0
    for name, gb in FAMILY_BF16_GB.items():
        n = math.ceil(gb / SHARD_GB)
        total_shards += n
        # a shard task with 4 CPUs converts ~3.2x as fast as one CPU (the kernels' row threads)
        convert_s += n * SHARD_GB * 1e9 / (shard_rate * 3.2)
    waves = math.ceil(total_shards / slots)
    conv_wall = waves * SHARD_GB * 1e9 / (shard_rate * 3.2)
    eval_tokens = 100 * 512  # the real config: 100 chunks of 512
    eval_cpu_s = sum(ACTIVE_B[n] * 1e9 * eval_tokens * (1 + len(RECIPES)) / eval_rate for n in FAMILY_BF16_GB)
    eval_wall = eval_cpu_s / (nodes * cores * 0.8)
    # each file is one assembly task, all in parallel: the largest (31B's BF16) decides
    asm_wall = max(FAMILY_BF16_GB.values()) * 1e9 / asm_rate
    # the critical path: 31B's base records are one task on one node (every corpus token
    # through the BF16 model), then its files' ranges (the config's 8 a file) side by side
    base_31b = PARAMS_B["31B"] * 1e9 * eval_tokens / (eval_rate * cores)
    critical = conv_wall + asm_wall + base_31b + base_31b / 8
    out.update(total_shards=total_shards, conversion_wall_s=conv_wall, conversion_cpu_s=convert_s * shard_cpus,
               evaluation_wall_s=eval_wall, assembly_wall_s=asm_wall, base_records_31b_s=base_31b,
               critical_path_s=critical, total_wall_s=max(conv_wall + asm_wall + eval_wall, critical),
               peak_node_memory_gb=(min(cores // shard_cpus, slots // nodes)) * declared_shard / 1e9,
               eval_memory_gb=_eval_memory_gb(),
               # four shard tasks (a shard and its BF16, Q8_0, Q4_0 and UD parts each), or
               # one assembly holding the largest file's parts and the file
               shard_disk_gb=(cores // shard_cpus) * SHARD_GB * (1 + 0.3 + 0.3 + 0.55 + 1.0),
               peak_node_disk_gb=max((cores // shard_cpus) * SHARD_GB * (1 + 0.3 + 0.3 + 0.55 + 1.0),
                                     2 * max(FAMILY_BF16_GB.values())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/var/tmp/qatgguf-cluster")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--model-only", action="store_true", help="reuse the last measurements")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "cluster-measurements.json"
    m = json.loads(path.read_text()) if args.model_only else measure(args)
    path.write_text(json.dumps(m, indent=1))
    print("\nper task: fetched MB, declared GB, peak RSS GB, seconds, node")
    for t in m["tasks"]:
        if "seconds" in t:
            print(f"  {t['task']:<40} {t.get('fetched', 0) / 1e6:>9.1f} {t['declared'].get('memory', 0) / 1e9:>6.2f} "
                  f"{t['peak_rss'] / 1e9:>6.2f} {t['seconds']:>8.1f}  {t['host'].rsplit('/', 1)[-1]}")
    print(f"release wall time on two 1-CPU nodes: {m.get('release_wall_seconds', 0):.0f} s")
    print(json.dumps(model(m), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
