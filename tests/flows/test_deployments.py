"""deployment.yaml: every deployment points at an importable flow with the declared
parameters; the real family's deployments are ready for the cluster's pool."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_release_and_nightly_deployments_load():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployment.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"release", "nightly", "release-gemma-4-qat", "nightly-gemma-4-qat"}
    for d in deployments.values():
        # module entrypoints: Ray workers unpickle tasks by module name, so the flow's
        # module must be importable under the same name there (not loaded as a script)
        assert ".py:" not in d["entrypoint"]
        flow = load_flow_from_entrypoint(d["entrypoint"])
        params = set(flow.parameters.properties)
        assert set(d["parameters"]) <= params
        assert flow.name in ("release", "nightly") and d["name"].startswith(flow.name)
        real = d["parameters"]["config"] == "gemma-4-qat"
        assert d["work_pool"]["name"] == ("qatgguf-cluster" if real else "qatgguf-local")
        # the config each deployment names validates
        from qatgguf.flows.release import load_config

        load_config(d["parameters"]["config"])
    assert {"config", "models", "recipes"} <= set(deployments["release"]["parameters"])
    cron = deployments["nightly"]["schedules"][0]
    assert cron["cron"] == "0 2 * * *" and cron["timezone"] == "UTC"
    assert deployments["nightly-gemma-4-qat"]["parameters"] == {"config": "gemma-4-qat"}
    assert deployments["nightly-gemma-4-qat"]["concurrency_limit"] == 1
    assert not deployments["release"].get("schedules")  # on demand only
