"""The nightly against an upstream on the Hub test server, with a new commit pushed between
runs: nothing changed (no task, no Hub commit), only the chat template changed (no
quantization, no evaluation, one Hub commit), one shard changed (exactly that shard's
quantization). Then `qatgguf gc` keeps what the last release uses and sweeps leftovers."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qatgguf.config import builtin_config_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
UPSTREAM = "tester/12B"
REPO = "tester/12B-GGUF"


def _run(cmd: list[str], env: dict, cwd: Path) -> tuple[dict, float]:
    t0 = time.monotonic()
    p = subprocess.run([str(BIN / "qatgguf"), *cmd, "--json"], env=env, capture_output=True, text=True, cwd=cwd,
                       timeout=1200)
    dt = time.monotonic() - t0
    out = p.stdout
    text = out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out[out.index("{"):] if "{" in out else ""
    try:
        return json.loads(text), dt
    except ValueError:
        raise AssertionError(f"{cmd}: no JSON summary; stderr:\n{p.stderr[-4000:]}") from None


def _task_logs(name: str) -> list[str]:
    """The log messages Prefect holds for the task runs called `name`."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName

    async def go() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[r.id for r in runs])))
            return [log.message for log in logs]

    return asyncio.run(go())


def _tasks(result: dict, prefix: str) -> list[dict]:
    return [t for s in result.get("models", {}).values() for t in s["tasks"] if t["task"].startswith(prefix)]


def _store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def _flip_one_value(shard: Path) -> bytes:
    """The shard with the lowest mantissa bit of its first bf16 value flipped: still a valid
    checkpoint, other bytes."""
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"
                and v["data_offsets"][1] > v["data_offsets"][0])
    at = 8 + n + header[name]["data_offsets"][0]
    raw[at] ^= 1
    return bytes(raw)


def test_nightly_redoes_only_what_changed(tmp_path, tiny_family, fake_hub, prefect_server):
    from huggingface_hub import HfApi
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    api.create_repo(UPSTREAM)
    api.upload_folder(folder_path=str(tiny_family["12B"]), repo_id=UPSTREAM)
    tiny = yaml.safe_load(builtin_config_path("tiny-family").read_text())
    raw = {
        "version": 1, "family": "nightly-test", "license": "apache-2.0", "base_recipe": "bf16", "recipes": ["q4_0"],
        "gate": tiny["gate"], "eval": {"ctx": 128, "chunks": 4, "chunk_tasks": 1, "batch": 128},
        "store": {"url": str(tmp_path / "store")}, "sources": {"hf_endpoint": fake_hub.url},
        "publish": {"target": "hub", "endpoint": fake_hub.url}, "ray": {"address": "local", "num_cpus": 2},
        "models": [{"name": "12B", "source": f"hf://{UPSTREAM}@main", "repo": REPO, "file_prefix": "m"}],
    }
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "QATGGUF_CACHE": str(tmp_path / "cache"),
           "HF_TOKEN": fake_hub.token, "HF_HUB_DISABLE_XET": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    hub = fake_hub.hub
    figures = {}

    full, figures["full"] = _run(["release", str(cfg)], env, tmp_path)
    assert full["state"] == "Completed", full.get("message")
    n_shards = len(_tasks(full, "quantize-"))
    commits = len(hub.commits(REPO))
    first_sha = hub.files(REPO)["m-Q4_0.gguf"].lfs_sha256
    figures["full_tasks"] = sum(len(s["tasks"]) for s in full["models"].values())

    # the core's own log lines are in the task's log in Prefect: tensors, types, bytes, seconds
    logs = _task_logs("quantize-12B-shard-1")
    assert any("model.language_model." in m and " -> blk." in m and "bytes in" in m for m in logs), logs[:5]
    assert any("Q4_0" in m for m in logs)

    # nothing changed: no task at all, no Hub commit, an artifact says so
    sizes = []
    for _ in range(5):
        same, dt = _run(["nightly", str(cfg)], env, tmp_path)
        assert same["state"] == "Completed" and same["unchanged"] is True, same
        assert same["since"] == [full["release_id"]] and same["models"] == {}
        sizes.append(_store_bytes(tmp_path / "store"))
        figures.setdefault("unchanged", []).append(round(dt, 1))
    assert len(hub.commits(REPO)) == commits
    assert len(set(sizes)) == 1  # five runs, not one byte more in the store
    figures["store_bytes"] = sizes

    async def nightly_artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nightly-test-nightly"])))

    import asyncio

    arts = asyncio.run(nightly_artifacts())
    assert arts and f"unchanged since release {full['release_id']}" in arts[0].description

    # only the chat template changed upstream: reassembled from stored parts, evaluations
    # reused (the template does not change a logit), one Hub commit
    tok_cfg = json.loads((tiny_family["12B"] / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] += "{#- a fixed template #}"  # the template llama.cpp's converter embeds
    api.upload_file(path_or_fileobj=json.dumps(tok_cfg, indent=2).encode(), path_in_repo="tokenizer_config.json",
                    repo_id=UPSTREAM)
    tmpl, figures["template"] = _run(["nightly", str(cfg)], env, tmp_path)
    assert tmpl["state"] == "Completed" and tmpl["changed"] == ["12B"], tmpl
    assert _tasks(tmpl, "quantize-") == [] and _tasks(tmpl, "evaluate-") == [] and _tasks(tmpl, "base-records") == []
    assert len(_tasks(tmpl, "assemble-")) == 2
    assert tmpl["models"]["12B"]["status"] == "published"
    assert len(hub.commits(REPO)) == commits + 1
    assert hub.files(REPO)["m-Q4_0.gguf"].lfs_sha256 != first_sha  # the new template is in the file
    figures["template_tasks"] = len(tmpl["models"]["12B"]["tasks"])

    # one shard re-uploaded upstream: exactly that shard is quantized again
    index = json.loads((tiny_family["12B"] / "model.safetensors.index.json").read_text())
    shard_name = sorted(set(index["weight_map"].values()))[1]
    api.upload_file(path_or_fileobj=_flip_one_value(tiny_family["12B"] / shard_name), path_in_repo=shard_name,
                    repo_id=UPSTREAM)
    one, figures["one_shard"] = _run(["nightly", str(cfg)], env, tmp_path)
    assert one["state"] == "Completed" and one["changed"] == ["12B"], one
    quantized = _tasks(one, "quantize-")
    assert [t["task"] for t in quantized] == ["quantize-12B-shard-1"] and not quantized[0].get("reused")
    assert sorted(one["models"]["12B"]["reused"]["shards"]) == [i for i in range(n_shards) if i != 1]
    assert len(hub.commits(REPO)) == commits + 2
    figures["one_shard_tasks"] = len(one["models"]["12B"]["tasks"])
    print(f"nightly figures: {figures}")

    # retention: keep the last release; what it uses stays, the rest goes; leftovers swept
    scratch = tmp_path / "cache" / "work" / "12B-shard9-killed"
    scratch.mkdir(parents=True)
    (scratch / "q4_0.part.tmp999999").write_bytes(b"half a part")  # its process is gone
    store_tmp = tmp_path / "store" / "cas" / ".left.json.tmp-0123"
    store_tmp.write_bytes(b"{")
    os.utime(store_tmp, (0, 0))
    before = _store_bytes(tmp_path / "store")
    gc, _ = _run(["gc", str(cfg), "--keep", "1", "--grace-hours", "0"], env, tmp_path)
    assert gc["kept_releases"] == {"nightly-test": [one["release_id"]]}
    assert len(gc["removed_releases"]) == 2 and gc["removed_objects"] > 0 and gc["kept_objects"] > 0
    assert gc["swept_scratch"] == 1 and not scratch.exists()
    assert gc["swept_temp"] == 1 and not store_tmp.exists()
    assert _store_bytes(tmp_path / "store") < before
    # the kept release still has everything: the nightly finds nothing to do, and a new
    # release of the same inputs converts and evaluates nothing
    same, _ = _run(["nightly", str(cfg)], env, tmp_path)
    assert same["unchanged"] is True and same["since"] == [one["release_id"]]
    again, _ = _run(["release", str(cfg)], env, tmp_path)
    assert again["state"] == "Completed"
    assert [t for t in _tasks(again, "") if not t["task"].startswith(("source-", "plan-", "gate-", "publish-"))] == []
