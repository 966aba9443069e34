"""A release on a two-node Ray cluster whose nodes share no disk: sources only from the Hub
test server and the S3 test server, the store on S3, files published to the Hub test
server. Shard tasks run on both nodes; the published files equal a one-process
conversion of the same checkpoints; no secret is found anywhere it must not be."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cluster import BIN, prefect_server, requires_nodes, start_nodes, stop_nodes
from servers.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY

from qatgguf.config import builtin_config_path

pytestmark = [pytest.mark.integration, pytest.mark.slow, requires_nodes()]

RECIPES = ["UD-Q4_K_XL", "q4_0"]
# Ray's job table as the GCS keeps it (what its dashboard and job API would show):
# every job's runtime_env, entrypoint and metadata
JOB_TABLE = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from ray._private.worker import global_worker
for job in global_worker.gcs_client.get_all_job_info().values():
    print(job)
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_tail(text: str) -> dict:
    return json.loads(text[text.rindex("\n{\n") + 1:] if "\n{\n" in text else text[text.index("{"):])


def _release_config(tmp_path: Path, *, bucket: str, s3_url: str, hub_url: str) -> Path:
    tiny = yaml.safe_load(builtin_config_path("tiny-family").read_text())
    raw = {
        "version": 1, "family": "cluster-test", "license": "apache-2.0", "base_recipe": "bf16",
        "recipes": RECIPES, "gate": tiny["gate"],
        "eval": {"ctx": 256, "chunks": 8, "chunk_tasks": 2, "batch": 512},
        "store": {"url": f"s3://{bucket}/store", "endpoint_url": s3_url},
        "sources": {"hf_endpoint": hub_url},
        "publish": {"target": "hub", "endpoint": hub_url, "collection": "Cluster test"},
        "models": [
            {"name": "E2B", "source": "hf://tester/E2B@main", "repo": "tester/E2B-GGUF", "file_prefix": "e2b"},
            {"name": "26B-A4B", "source": f"s3://{bucket}/sources/26B-A4B", "repo": "tester/26B-A4B-GGUF",
             "file_prefix": "moe"},
        ],
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_release_on_two_nodes_with_private_disks(tmp_path, tiny_family, fake_hub, s3_server, s3_bucket):
    from huggingface_hub import HfApi

    from qatgguf.convert import convert
    from qatgguf.convert.mmproj import write_mmproj
    from qatgguf.store import open_store

    # the sources: E2B (KV-shared) on the Hub test server, the MoE on S3
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    api.create_repo("tester/E2B")
    api.upload_folder(folder_path=str(tiny_family["E2B"]), repo_id="tester/E2B")
    src = open_store(f"s3://{s3_bucket}/sources/26B-A4B", endpoint_url=s3_server.endpoint_url,
                     credentials=s3_server.credentials)
    for f in sorted(tiny_family["26B-A4B"].iterdir()):
        src.put_file(f, f.name)
    cfg = _release_config(tmp_path, bucket=s3_bucket, s3_url=s3_server.endpoint_url, hub_url=fake_hub.url)

    secrets_env = {"HF_TOKEN": fake_hub.token, "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                   "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                   "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    secrets = [fake_hub.token, TEST_ACCESS_KEY, TEST_SECRET_KEY]
    with prefect_server(tmp_path / "prefect") as server:
        nodes = start_nodes(tmp_path / "cluster", n=2, env=secrets_env)
        try:
            t0 = time.monotonic()
            p = nodes.head.run([str(BIN / "qatgguf"), "release", str(cfg), "--json"],
                               env=nodes.driver_env(PREFECT_API_URL=server.url), capture_output=True, text=True,
                               cwd=tmp_path)
            wall = time.monotonic() - t0
            assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
            out = _json_tail(p.stdout)
            assert out["state"] == "Completed", out.get("message")
            # what the private disks hold is visible only in each node's namespace
            leaks = {n.name: n.grep(secrets) for n in nodes.nodes}
            jobs = nodes.head.run([str(BIN / "python"), "-c", JOB_TABLE, nodes.address], capture_output=True,
                                  text=True)
            assert nodes.head.run(["test", "-d", str(nodes.private / "cache" / "work")]).returncode == 0
        finally:
            stop_nodes(nodes)
        prefect_files = [f for f in server.home.rglob("*") if f.is_file()]
    print(f"two-node release wall time: {wall:.1f} s")

    manifest = json.loads(open_store(f"s3://{s3_bucket}/store", endpoint_url=s3_server.endpoint_url,
                                     credentials=s3_server.credentials).get_bytes(out["manifest"]))
    models = manifest["models"]
    assert {m: s["status"] for m, s in models.items()} == {"E2B": "published", "26B-A4B": "published"}
    hosts = {t["host"] for s in models.values() for t in s["tasks"]
             if t["task"].startswith("quantize-") and t.get("host")}
    assert len({h.rsplit("/", 1)[-1] for h in hosts}) == 2, hosts  # shard tasks ran on both nodes
    for s in models.values():
        for t in s["tasks"]:
            if t["task"].startswith(("quantize-", "assemble-", "evaluate-", "base-records-")):
                assert t["peak_rss"] > 0 and t["declared"]["memory"] >= 256 * 2**20, t
    e2b = models["E2B"]["source"]
    assert e2b["uri"] == "hf://tester/E2B" and e2b["revision"] == api.repo_info("tester/E2B").sha

    # the published files equal a one-process conversion of the same checkpoints
    hub = fake_hub.hub
    for name, repo, prefix in (("E2B", "tester/E2B-GGUF", "e2b"), ("26B-A4B", "tester/26B-A4B-GGUF", "moe")):
        published = hub.files(repo)
        for r in RECIPES:
            label = r if r.startswith("UD-") else r.upper()
            ref = convert(tiny_family[name], tmp_path / "single" / name / f"{prefix}-{label}.gguf", recipe=r)[0]
            assert published[ref.name].lfs_sha256 == _sha256(ref), (name, r)
        mm = write_mmproj(tiny_family[name], tmp_path / "single" / name / "mmproj-BF16.gguf")
        assert published["mmproj-BF16.gguf"].lfs_sha256 == _sha256(mm)

    # no secret in Ray's session folders, Ray's job metadata, the Prefect database and
    # logs, the store or the published repos
    assert leaks == {"node0": [], "node1": []}
    assert jobs.returncode == 0 and "serialized_runtime_env" in jobs.stdout and "PREFECT_API_URL" in jobs.stdout
    assert not [s for s in secrets if s in jobs.stdout]
    assert [f for f in prefect_files if any(s.encode() in f.read_bytes() for s in secrets)] == []
    client = s3_server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
            assert not [s for s in secrets if s in obj["Key"] or s.encode() in body], obj["Key"]
    for repo in ("tester/E2B-GGUF", "tester/26B-A4B-GGUF"):
        for path, entry in hub.files(repo).items():
            data = entry.content if entry.content is not None else hub._blob_path(entry.lfs_sha256).read_bytes()
            assert not [s for s in secrets if s.encode() in data], (repo, path)
    assert subprocess.run(["grep", "-r", "-l", "-F", fake_hub.token, str(hub.storage)],
                          capture_output=True).stdout == b""
