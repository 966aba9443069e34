"""Machines for the cluster tests, on this one: a Ray head and workers that share no disk,
and a Prefect server.

Each Ray node runs in its own mount namespace with a private tmpfs over the same path
(`NodeSet.private`), which holds its cache, scratch folders and Ray session: a file one
node writes there does not exist for the others, as on separate machines. The flow runs
in the head's namespace (`Node.run`), as a Prefect worker on the head machine would. The
nodes share only the network (loopback): the sources, the artifact store and the Prefect
API. Needs root (CI runs as root) and `unshare`/`nsenter` from util-linux.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def can_make_nodes() -> str | None:
    """None when private-disk nodes can run here, else why not."""
    if os.geteuid() != 0:
        return "private-disk nodes need root (mount namespaces with a tmpfs)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare --mount fails here: {probe.stderr.decode()[-200:]}"
    return None


def free_port_block(size: int = 300) -> int:
    """The first of `size` consecutive ports that are free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size > 65000:
            continue
        ok = True
        for p in (base, base + 1, base + 2, base + 3, base + 4, base + 5, base + 6, base + 7):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    private: Path
    env: dict[str, str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800,
            **kw) -> subprocess.CompletedProcess:
        """A command in this node's mount namespace (it sees this node's private disk)."""
        return subprocess.run(["nsenter", "--target", str(self.pid), "--mount", "--", *cmd],
                              env=env if env is not None else self.env, timeout=timeout, **kw)

    def popen(self, cmd: list[str], *, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", "--target", str(self.pid), "--mount", "--", *cmd],
                                env=env if env is not None else self.env, start_new_session=True, **kw)

    def grep(self, needles: list[str]) -> list[str]:
        """Files under this node's private disk that contain any of `needles`."""
        args = [a for n in needles for a in ("-e", n)]
        p = self.run(["grep", "-r", "-l", "-a", "-F", *args, str(self.private)], capture_output=True, text=True)
        return [line for line in p.stdout.splitlines() if line]


@dataclass
class NodeSet:
    root: Path
    private: Path  # the same path on every node, a private tmpfs on each
    port: int
    token: str
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def driver_env(self, **extra: str) -> dict[str, str]:
        """What a process on the head machine runs with: the head's private folders."""
        return {**self.head.env, "RAY_ADDRESS": self.address, **extra}


def _node_script(private: Path, disk: Path | None) -> str:
    """Mount the node's private disk over `private` (in its own namespace): a tmpfs, or a
    bind mount of the node's own folder on the host's disk for big scratch space."""
    mount = f"mount --bind {disk} {private}" if disk else f"mount -t tmpfs -o size=4g tmpfs {private}"
    return f"set -e; {mount}; mkdir -p {private}/tmp {private}/cache {private}/hf; exec \"$@\""


def start_nodes(root: Path, *, n: int, env: dict[str, str], cpus: int = 1, memory: int = 6_000_000_000,
                on_disk: bool = False) -> NodeSet:
    """Start a head and n-1 workers; `env` is each node's own environment (its secrets).
    `on_disk` backs each node's private folder with its own folder under `root` instead
    of a 4 GB tmpfs."""
    # a short path: Ray's unix sockets live below it (at most 107 bytes)
    private = Path(tempfile.mkdtemp(prefix="qgn-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    base = free_port_block(300 * n)
    token = secrets.token_hex(16)
    common_env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")},
        **env,
        "TMPDIR": f"{private}/tmp", "QATGGUF_CACHE": f"{private}/cache", "HF_HOME": f"{private}/hf",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_WAIT_POLICY": "passive",
    }
    nodes = NodeSet(root=root, private=private, port=base, token=token, env=common_env)
    for i in range(n):
        p = base + 300 * i
        args = [str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus}", f"--memory={memory}",
                "--object-store-memory=150000000", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={p + 11}", f"--dashboard-agent-grpc-port={p + 12}",
                f"--metrics-export-port={p + 13}", f"--runtime-env-agent-port={p + 14}",
                f"--node-manager-port={p + 15}", f"--object-manager-port={p + 16}",
                f"--min-worker-port={p + 100}", f"--max-worker-port={p + 299}"]
        if i == 0:
            args += ["--head", f"--port={base}", f"--ray-client-server-port={p + 17}", "--include-dashboard=false",
                     f"--temp-dir={private}/ray"]
        else:
            args += [f"--address={nodes.address}"]
        log = root / f"node{i}.log"
        disk = root / f"node{i}-disk" if on_disk else None
        if disk is not None:
            disk.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _node_script(private, disk), "node",
             *args],
            env=common_env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        nodes.nodes.append(Node(f"node{i}", proc, private, common_env, log))
        _wait_nodes(nodes, i + 1)
    return nodes


def _wait_nodes(nodes: NodeSet, count: int, timeout: float = 120) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for node in nodes.nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited: {node.log.read_text(errors='replace')[-2000:]}")
        p = nodes.head.run([sys.executable, "-c", code, nodes.address], capture_output=True, text=True, timeout=60)
        last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
        if last.isdigit() and int(last) >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes: {last}")


def stop_nodes(nodes: NodeSet) -> None:
    """Stop every node (their private disks vanish with them)."""
    for node in reversed(nodes.nodes):
        with _suppress():
            os.killpg(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for node in nodes.nodes:
        with _suppress():
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with _suppress():
            os.killpg(node.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)
    shutil.rmtree(nodes.private, ignore_errors=True)


@contextmanager
def _suppress() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, subprocess.TimeoutExpired, OSError):
        pass


@dataclass
class PrefectServer:
    url: str
    home: Path
    proc: subprocess.Popen


@contextmanager
def prefect_server(home: Path) -> Iterator[PrefectServer]:
    """A real Prefect server (SQLite in `home`) on a free port, stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield PrefectServer(url, home, proc)
    finally:
        with _suppress():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)


def requires_nodes() -> pytest.MarkDecorator:
    why = can_make_nodes()
    return pytest.mark.skipif(why is not None, reason=why or "")
