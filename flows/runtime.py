"""Where flows run: the Prefect API (a local server started on demand) and the Ray cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from qatgguf.paths import cache_root

DEFAULT_API_URL = "http://127.0.0.1:4200/api"

# Environment that Ray worker processes need to report task runs (and the core's log
# lines) to the same Prefect API. Nothing secret and nothing machine-local: Ray keeps
# runtime_env in its GCS and shows it on the dashboard, and each node has its own caches.
# Tokens and keys reach workers from their node's own environment (the cluster's secret
# store), never from here.
_FORWARDED_ENV = ("PREFECT_API_URL", "PREFECT_LOGGING_EXTRA_LOGGERS", "HF_HUB_DISABLE_XET")
LOGGERS = "qatgguf"


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def ensure_prefect_server(*, timeout: float = 120.0) -> str:
    """The API URL of a running Prefect server: PREFECT_API_URL if set (it must answer),
    else 127.0.0.1:4200, started in the background (SQLite) when nothing answers there."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not _healthy(configured, timeout=10):
            raise RuntimeError(f"PREFECT_API_URL={configured} does not answer /health; start that server or unset it")
        return configured
    if _healthy(DEFAULT_API_URL):
        return DEFAULT_API_URL
    home = cache_root()
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "prefect-server.log", "ab")
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false")
    prefect = Path(sys.executable).with_name("prefect")
    subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", "4200"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(DEFAULT_API_URL):
            return DEFAULT_API_URL
        time.sleep(0.5)
    raise RuntimeError(f"the local Prefect server did not come up within {timeout:.0f}s; see {home / 'prefect-server.log'}")


class ReleaseRayTaskRunner(RayTaskRunner):
    """RayTaskRunner that forwards the current Prefect API URL (read when the flow starts,
    not when the module is imported) to the Ray workers' environment."""

    def __enter__(self):
        from prefect.settings import PREFECT_API_URL

        env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
        if PREFECT_API_URL.value():
            env["PREFECT_API_URL"] = PREFECT_API_URL.value()
        env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", LOGGERS)
        kwargs = dict(self.init_kwargs or {})
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
        kwargs["runtime_env"] = runtime_env
        self.init_kwargs = kwargs
        return super().__enter__()


def ray_task_runner(address: str | None = None, *, num_cpus: int | None = None) -> ReleaseRayTaskRunner:
    """RAY_ADDRESS (or `address`) joins a cluster; otherwise a private local instance."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    init_kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
    if address == "local":
        init_kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        init_kwargs["object_store_memory"] = 512 * 1024 * 1024
    return ReleaseRayTaskRunner(address=address, init_kwargs=init_kwargs)


@contextmanager
def task_resources(*, memory: int, num_cpus: int = 1, gpu: bool = False) -> Iterator[None]:
    """Ray resources of the tasks submitted inside: the memory their plan says they need
    (so a 31B shard lands on a node with room for it), CPUs, a GPU when asked. Ray must
    not retry silently: retries are Prefect's, so they show in the UI."""
    with remote_options(num_cpus=num_cpus, num_gpus=1 if gpu else 0, memory=int(memory), max_retries=0):
        yield


@contextmanager
def eval_resources() -> Iterator[bool]:
    """Whether evaluation tasks take a GPU: only when the installed llama.cpp can offload
    and the cluster has one."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    yield bool(gpus) and gpu_offload_supported()


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())
