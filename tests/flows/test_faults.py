"""Resume after faults: a Ray worker killed with SIGKILL in the middle of a shard, and the
flow's own process killed in the middle of a release. Rerunning (`--resume`) reuses every
finished shard and evaluation, and the files and card equal a clean run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from medium import build_medium

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
RELEASE_ID = "fault-release"
REPO = "test/medium-GGUF"


def _config(root: Path, source: Path) -> Path:
    raw = {
        "version": 1, "family": "fault-test", "license": "apache-2.0", "base_recipe": "bf16", "recipes": ["q4_0"],
        # a random model: the gate only has to pass, the faults are the subject
        "gate": {"max_mean_kld": 100.0, "max_kld_99_9": 1000.0, "min_same_top_p": 0.0, "max_ppl_ratio": 100.0},
        "eval": {"ctx": 128, "chunks": 8, "chunk_tasks": 2, "batch": 256},
        "store": {"url": str(root / "store")},
        "publish": {"target": "local", "local_root": str(root / "hub")},
        "ray": {"address": "local", "num_cpus": 2},
        "models": [{"name": "M", "source": str(source), "repo": REPO, "file_prefix": "medium"}],
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "release.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(cfg: Path, env: dict, *, resume: bool = False) -> subprocess.Popen:
    args = ["--resume", RELEASE_ID] if resume else ["--release-id", RELEASE_ID]
    return subprocess.Popen([str(BIN / "qatgguf"), "release", str(cfg), *args, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=cfg.parent)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> dict:
    out, err = proc.communicate(timeout=timeout)
    text = out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out[out.index("{"):]
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"no JSON summary; stderr tail:\n{err[-4000:]}") from None


def _env(root: Path, api_url: str) -> dict:
    return {**os.environ, "PREFECT_API_URL": api_url, "QATGGUF_CACHE": str(root / "cache"),
            "RAY_USAGE_STATS_ENABLED": "0"}


def _manifest(root: Path) -> dict:
    return json.loads((root / "store" / "releases" / "fault-test" / RELEASE_ID / "manifest.json").read_text())


def _published(root: Path) -> dict[str, bytes]:
    repo = root / "hub" / REPO
    return {p.name: p.read_bytes() for p in sorted(repo.iterdir()) if p.is_file()}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def medium(tiny_family, tmp_path_factory) -> Path:
    return build_medium(tmp_path_factory.mktemp("medium") / "ckpt", tiny_family["31B"])


@pytest.fixture(scope="module")
def clean(medium, tmp_path_factory, prefect_server) -> tuple[dict, dict]:
    """A release of the same checkpoint with no fault: its manifest and published files."""
    root = tmp_path_factory.mktemp("clean")
    out = _finish(_start(_config(root, medium), _env(root, prefect_server)))
    assert out["state"] == "Completed", out.get("message")
    return _manifest(root), _published(root)


def _tasks(manifest: dict, prefix: str) -> list[dict]:
    return [t for t in manifest["models"]["M"]["tasks"] if t["task"].startswith(prefix)]


def test_worker_killed_in_the_middle_of_a_shard(medium, clean, tmp_path, prefect_server):
    root = tmp_path / "run"
    cfg = _config(root, medium)
    proc = _start(cfg, _env(root, prefect_server))
    work = root / "cache" / "work"
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        # a shard task writes its part under a temporary name that carries its pid
        for part in work.glob("M-shard*-*/*.part.tmp*"):
            pid = int(part.name.rsplit(".tmp", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed = part.parent.name.split("-")[1]
            break
        time.sleep(0.002)
    assert killed is not None, "no shard task was caught converting"
    first = _finish(proc)
    assert first["state"] == "Failed" and f"quantize-M-{killed.replace('shard', 'shard-')}" in first["message"]
    m1 = _manifest(root)
    assert m1["models"]["M"]["status"] == "failed"
    done_first = {t["task"] for t in _tasks(m1, "quantize-") if t["state"] == "completed"}
    n_shards = len(_tasks(clean[0], "quantize-"))
    assert len(done_first) < n_shards

    again = _finish(_start(cfg, _env(root, prefect_server), resume=True))
    assert again["state"] == "Completed", again.get("message")
    m2 = _manifest(root)
    reused = m2["models"]["M"]["reused"]["shards"]
    ran = [t for t in _tasks(m2, "quantize-") if not t.get("reused")]
    # every shard finished before the kill is reused; only the others run again
    assert {f"quantize-M-shard-{i}" for i in reused} == done_first
    assert len(ran) == n_shards - len(done_first)
    print(f"worker kill: {len(done_first)} shards finished before, {len(ran)} ran on resume, "
          f"{len(reused)} reused")
    assert _published(root) == clean[1]  # GGUFs, projector, card and repo manifest


def test_flow_process_killed_in_the_middle_of_a_release(medium, clean, tmp_path, prefect_server):
    root = tmp_path / "run"
    cfg = _config(root, medium)
    proc = _start(cfg, _env(root, prefect_server))
    store = root / "store" / "cas" / "eval"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if list(store.glob("*/*/range.npz")):  # an evaluation range is stored
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the release finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # the flow's own process
    _kill_group(proc)  # and the local Ray it started, as a lost machine would lose it
    assert not (root / "store" / "releases" / "fault-test" / RELEASE_ID / "manifest.json").exists()
    ranges_before = len(list(store.glob("*/*/range.npz")))

    again = _finish(_start(cfg, _env(root, prefect_server), resume=True))
    assert again["state"] == "Completed", again.get("message")
    m = _manifest(root)
    model = m["models"]["M"]
    n_shards = len(_tasks(clean[0], "quantize-"))
    assert model["reused"]["shards"] == list(range(n_shards))  # every shard was done
    assert _tasks(m, "quantize-") == [] and _tasks(m, "assemble-") == []
    ranges = _tasks(m, "evaluate-")
    # a range is reused by its task (found under its key) or, when its merged evaluation was
    # stored too, not even submitted (the plan found the evaluation)
    reused = sum(1 for t in ranges if t.get("reused")) + 2 * len(model["reused"]["evaluations"])
    ran = sum(1 for t in ranges if not t.get("reused"))
    assert reused >= ranges_before >= 1 and ran + reused == 2
    print(f"flow kill: {n_shards} shards and {ranges_before} evaluation range(s) done before; resume ran "
          f"{ran} range task(s), reused {reused}")
    assert _published(root) == clean[1]
