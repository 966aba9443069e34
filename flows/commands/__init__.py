"""The `qatgguf` subcommands that run the Prefect flows (`release`, `nightly`). They are
registered under the `qatgguf.commands` entry-point group, so the core CLI lists them
without importing prefect itself."""
