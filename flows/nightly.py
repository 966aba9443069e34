"""Nightly re-quantization: the release flow on a schedule (see deployment.yaml)."""

from __future__ import annotations

from prefect import flow

from flows.release import release


@flow(name="nightly", log_prints=True)
def nightly(config: str = "tiny-family", models: list[str] | None = None) -> dict:
    """Re-run the release of a family; base records already in the store are reused."""
    return release(config=config, models=models)
