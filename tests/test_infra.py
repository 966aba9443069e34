"""infra/: the Kubernetes manifests validate against the Kubernetes schemas, the cluster
launcher config against Ray's own schema; the RayCluster keeps the dashboard private and
takes secrets from the Secret only; the local stack starts, returns through a pipe and
stops every process it started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.30.0"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def test_kubernetes_manifests_validate():
    import kubernetes_validate

    docs = _docs("prefect.yaml") + _docs("secrets.example.yaml") + [
        d for d in _docs("kuberay-cluster.yaml") if d["kind"] != "RayCluster"]
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "Secret",
                                        "NetworkPolicy"}
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # nothing is exposed outside the cluster
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in docs if d["kind"] == "Service")
    assert not [d for d in docs if d["kind"] == "Ingress"]
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does check
        kubernetes_validate.validate({**docs[0], "spec": {"replicas": "many"}} if docs[0]["kind"] == "Deployment"
                                     else {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                                           "spec": {"ports": "all"}}, K8S_VERSION, strict=True)


def test_raycluster_keeps_the_dashboard_private_and_secrets_in_the_secret():
    (cluster,) = [d for d in _docs("kuberay-cluster.yaml") if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == "2.60.0"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    images = set()
    for c in _containers(cluster) + [c for d in _docs("prefect.yaml") if d["kind"] == "Deployment"
                                     for c in _containers(d) if "qatgguf" in c["image"]]:
        images.add(c["image"].split(":")[0])
        assert {"secretRef": {"name": "qatgguf-secrets"}} in c["envFrom"], c["name"]
        # no secret value written into a manifest
        for e in c.get("env", []):
            assert not re.search(r"TOKEN$|SECRET|ACCESS_KEY", e["name"]) or e["name"] == "RAY_AUTH_MODE", e
        assert c["resources"]["limits"]["memory"] and c["resources"]["limits"]["cpu"]
    assert images == {"ghcr.io/example/qatgguf"}  # every pod runs the same image
    policy = next(d for d in _docs("kuberay-cluster.yaml") if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # the Prefect worker reaches Ray through Ray Client and the API through the service
    worker = next(c for d in _docs("prefect.yaml") if d["kind"] == "Deployment"
                  for c in _containers(d) if c["name"] == "prefect-worker")
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["RAY_ADDRESS"] == "ray://qatgguf-head-svc:10001"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_ray_cluster_launcher_config_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert cfg["docker"]["image"].startswith("ghcr.io/example/qatgguf:")
    assert not [o for o in cfg["docker"]["run_options"] if re.search(r"(TOKEN|SECRET|KEY)=", o)]


def test_dockerfile_pins_what_the_project_pins():
    text = (INFRA / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    assert f"torch=={torch}" in text
    assert re.search(r"^FROM \$\{BASE\}", text, re.M) and "python:3.11" in text
    assert 'CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install .' in text and "-DGGML_CUDA=on" in text
    assert "COPY flows" in text and "COPY tasks" in text and "QATGGUF_HOME=/opt/qatgguf-src" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.integration
@pytest.mark.slow
def test_local_stack_up_through_a_pipe_and_down(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api", "QATGGUF_CACHE": str(tmp_path),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("QATGGUF_ALERT_WEBHOOK", None)
    script = INFRA / "local-stack.sh"
    state = tmp_path / "stack"
    try:
        t0 = time.monotonic()
        # piped, `up` must return once the stack runs (no child keeps the pipe open)
        up = subprocess.run(f"'{script}' up | tail -n 2", shell=True, env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stderr[-2000:]
        assert "Prefect UI:" in up.stdout and time.monotonic() - t0 < 300
        pids = {p: int((state / f"{p}.pid").read_text()) for p in ("server", "worker")}
        assert all(_group_alive(g) for g in pids.values())
        again = subprocess.run([str(script), "up"], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and int((state / "worker.pid").read_text()) == pids["worker"]  # idempotent
        worker_cmd = subprocess.run(["ps", "-ww", "-o", "args=", "-g", str(pids["worker"])], capture_output=True,
                                    text=True).stdout
        assert "worker start --pool qatgguf-local" in worker_cmd
        down = subprocess.run([str(script), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0
        assert not any(_group_alive(g) for g in pids.values()), "down left a process of the stack running"
    finally:
        for p in ("server", "worker"):
            f = state / f"{p}.pid"
            if f.exists():
                try:
                    os.killpg(int(f.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


def _gib(q: str) -> int:
    assert q.endswith("Gi"), q
    return int(q[:-2]) * 2**30


def test_the_cluster_holds_the_largest_task_of_the_real_family():
    """Each evaluation task is placed whole on one node: the largest, 31B's BF16 base pass
    with the real config's settings, must fit what some worker group offers Ray's `memory`
    resource (the pod's limit less the object store and a GiB for Ray's own processes)."""
    from qatgguf.config import builtin_config_path, load_release_config
    from qatgguf.resources import eval_budget

    cfg = load_release_config(builtin_config_path("gemma-4-qat"))
    (cluster,) = [d for d in _docs("kuberay-cluster.yaml") if d["kind"] == "RayCluster"]
    offers = {}
    for g in cluster["spec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        store = int(g["rayStartParams"].get("object-store-memory", 0.3 * _gib(c["resources"]["limits"]["memory"])))
        offers[g["groupName"]] = _gib(c["resources"]["limits"]["memory"]) - store - 2**30
    # BF16 checkpoint sizes of the real family as listed on the Hub: 26B-A4B 50.5 GB, 31B 61.4 GB
    n_seq = max(1, cfg.eval.batch // cfg.eval.ctx)
    need = {size: eval_budget(gguf_bytes=int(gb * 1e9), n_ctx=cfg.eval.ctx, n_seq=n_seq, n_vocab=262144,
                              records_bytes=0, chunks=cfg.eval.chunks).memory
            for size, gb in {"26B-A4B": 50.5, "31B": 61.4}.items()}
    assert max(offers.values()) >= need["31B"], (offers, need)
    assert offers["cpu"] >= need["26B-A4B"], (offers, need)  # the common nodes take all but the largest
