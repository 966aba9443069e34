"""Store tests use the S3 server plugin; re-exported here until the root conftest lists
`servers.s3` in `pytest_plugins`."""

from __future__ import annotations

from servers.s3 import s3_bucket, s3_server  # noqa: F401
