"""Services for flow tests: a real Prefect server (the test harness) and a local Ray."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def local_ray(prefect_server):
    """One local Ray instance for the session; flows reuse it (RayTaskRunner joins an
    initialized Ray), and its workers report to the harness server."""
    import ray

    env = {"PREFECT_API_URL": prefect_server}
    for k in ("QATGGUF_CACHE", "PREFECT_HOME"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        namespace="prefect",
        runtime_env={"env_vars": env},
    )
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_flow_heartbeat():
    # Each sync flow call otherwise waits up to a second for its heartbeat thread at exit.
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
