"""deployment.yaml: both deployments point at importable flows with the declared parameters."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_release_and_nightly_deployments_load():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployment.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"release", "nightly"}
    for d in deployments.values():
        # module entrypoints: Ray workers unpickle tasks by module name, so the flow's
        # module must be importable under the same name there (not loaded as a script)
        assert ".py:" not in d["entrypoint"]
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert flow.name == d["name"]
        params = set(flow.parameters.properties)
        assert set(d["parameters"]) <= params
        assert d["work_pool"]["name"] == "qatgguf-local"
    assert {"config", "models", "recipes"} <= set(deployments["release"]["parameters"])
    cron = deployments["nightly"]["schedules"][0]
    assert cron["cron"] == "0 2 * * *" and cron["timezone"] == "UTC"
    assert not deployments["release"].get("schedules")  # on demand only
