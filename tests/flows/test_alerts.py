"""The alert automation of infra/automations.yaml, installed on the local server, fires
when a release run fails: its webhook receives the run's name and error."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from qatgguf.config import builtin_config_path

pytestmark = pytest.mark.integration


class _Hook(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        n = int(self.headers.get("Content-Length") or 0)
        type(self).received.append(self.rfile.read(n))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_failed_release_fires_the_alert(tmp_path, prefect_server, local_ray):
    from prefect.client.orchestration import get_client

    from qatgguf.flows.alerts import install_alerts
    from qatgguf.flows.release import release

    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    try:
        ids = install_alerts(webhook=url)
        assert len(ids) == 1 and install_alerts(webhook=url) != ids  # replaced by name, not duplicated

        async def named():
            async with get_client() as client:
                return await client.read_automations_by_name("qatgguf: release failed")

        (automation,) = asyncio.run(named())
        assert automation.enabled and automation.trigger.expect == {"prefect.flow-run.Failed",
                                                                     "prefect.flow-run.Crashed"}

        raw = yaml.safe_load(builtin_config_path("tiny-family").read_text())
        raw["store"] = {"url": str(tmp_path / "store")}
        raw["publish"] = {"target": "local", "local_root": str(tmp_path / "hub")}
        raw["models"] = [{**raw["models"][2], "source": str(tmp_path / "no-such-checkpoint")}]
        cfg = tmp_path / "broken.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        state = release(config=str(cfg), return_state=True)
        assert state.is_failed()
        deadline = time.monotonic() + 60
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _Hook.received, "the automation did not fire"
        text = _Hook.received[-1].decode()
        assert "release run" in text and "Failed" in text and "no-such-checkpoint" in text
    finally:
        server.shutdown()
