"""Real servers for tests (S3-compatible, Hub-compatible), exposed as pytest plugins."""
