"""pytest plugin: a real S3-compatible server (moto_server) as a subprocess on 127.0.0.1.

Fixtures:
- `s3_server` (session): the running server; `.endpoint_url`, `.credentials`, `.client()`.
- `s3_bucket` (function): a fresh, empty bucket name on that server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qatgguf.store import S3Credentials

# moto accepts any keys; these are distinctive so tests can look for leaks of them.
TEST_ACCESS_KEY = "AKIAQATGGUFTESTKEY01"
TEST_SECRET_KEY = "qatgguf-test-secret-9f2c1e7b5a4d3c2b1a0f"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    pid: int
    credentials: S3Credentials

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.credentials.access_key_id,
            aws_secret_access_key=self.credentials.secret_access_key,
            config=Config(s3={"addressing_style": "path"}),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    last_error: Exception | None = None
    for _attempt in range(3):  # another process may take the free port before moto binds it
        port = _free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            _wait_listening(proc, port, log, timeout=60)
        except RuntimeError as exc:
            _stop(proc)
            last_error = exc
            continue
        try:
            yield S3Server(
                endpoint_url=f"http://127.0.0.1:{port}",
                pid=proc.pid,
                credentials=S3Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY),
            )
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"could not start moto_server: {last_error}")


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    name = f"qatgguf-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
