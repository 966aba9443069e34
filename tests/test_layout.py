"""The package layout: the core (src/qatgguf) imports without prefect or ray, and the
orchestration packages install under the qatgguf namespace (qatgguf.flows, qatgguf.tasks)
with the release and nightly commands registered as `qatgguf` subcommands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import qatgguf

CORE = Path(qatgguf.__file__).resolve().parent


def _core_modules() -> list[str]:
    names = []
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_core_module_imports_without_prefect_or_ray():
    modules = _core_modules()
    assert "qatgguf.release" in modules and "qatgguf.cli" in modules and len(modules) > 50
    assert not any(m.startswith(("qatgguf.flows", "qatgguf.tasks")) for m in modules)
    # None in sys.modules makes any import of these packages raise ImportError
    code = "\n".join([
        "import importlib, sys",
        "for blocked in ('prefect', 'prefect_ray', 'ray'):",
        "    sys.modules[blocked] = None",
        f"for name in {modules!r}:",
        "    importlib.import_module(name)",
        "from qatgguf.cli import build_parser",
        "build_parser()",  # the core CLI lists the plugin commands without importing prefect
        "print('imported', len(sys.modules))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout


def test_orchestration_installs_under_the_qatgguf_namespace():
    from importlib.util import find_spec

    import qatgguf.flows.release
    import qatgguf.tasks.release

    root = CORE.parents[1]
    assert Path(qatgguf.flows.release.__file__).resolve() == root / "flows" / "release.py"
    assert Path(qatgguf.tasks.release.__file__).resolve() == root / "tasks" / "release.py"
    # no generic top-level names that another package could shadow
    code = "import importlib.util as u; print(u.find_spec('flows'), u.find_spec('tasks'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.stdout.strip() == "None None", proc.stdout + proc.stderr
    assert find_spec("qatgguf.flows.commands.release") is not None


def test_release_and_nightly_commands_come_from_entry_points():
    from qatgguf.cli import build_parser, plugin_commands

    assert dict(plugin_commands()) == {"release": "qatgguf.flows.commands.release",
                                       "nightly": "qatgguf.flows.commands.nightly"}
    parser = build_parser()
    args = parser.parse_args(["release", "tiny-family", "--release-id", "x"])
    assert args.run.__module__ == "qatgguf.flows.commands.release" and args.release_id == "x"
    args = parser.parse_args(["nightly", "tiny-family"])
    assert args.run.__module__ == "qatgguf.flows.commands.nightly"


def test_pyproject_lists_every_package():
    """`packages` in pyproject.toml is explicit (the orchestration folders are mapped into
    the namespace): every folder with an `__init__.py` must be on it, or a regular install
    leaves it out."""
    import tomllib

    root = CORE.parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(CORE.parent).parts) for p in CORE.rglob("__init__.py")}
    found |= {"qatgguf." + ".".join(p.parent.relative_to(root).parts)
              for folder in ("flows", "tasks") for p in (root / folder).rglob("__init__.py")}
    assert listed == found
