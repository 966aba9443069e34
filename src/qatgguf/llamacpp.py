"""The installed llama.cpp: its version and commit, its library folder, and the llama.cpp
command-line tools built from the same sources so that they run the same kernels.

llama-cpp-python ships only libraries (`llama_cpp/lib`). Its CPU kernels give different
last digits on different instruction sets, so `llama-perplexity` is only an oracle for
our numbers when it runs on the same machine with the same kernels. The tools here are
built once per machine from the sdist of the installed llama-cpp-python, with its own
CMakeLists.txt (the options its wheel was built with, plus `$CMAKE_ARGS` as pip passes
them), and they always run against the installed libraries (`LD_LIBRARY_PATH` points at
`llama_cpp/lib`): the tool's `ggml-cpu` is the very file llama-cpp-python loads.

    python -m qatgguf.llamacpp            # build (or find) the tools, print where they are
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from qatgguf.errors import EvaluationError
from qatgguf.paths import cache_root

DIST = "llama-cpp-python"
TOOLS = ("llama-perplexity", "llama-quantize", "llama-gguf-split")
# Options added to llama-cpp-python's own CMakeLists.txt: the tools, without the parts
# (multimodal, server, curl/openssl) that these three never link.
_TOOL_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",  # scikit-build-core's default build type for the wheel
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # RUNPATH, not RPATH: LD_LIBRARY_PATH (the installed libraries) then takes precedence
    "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--enable-new-dtags",
)


def installed_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EvaluationError(f"{DIST} is not installed; `pip install -e .` installs it") from None


def lib_dir() -> Path:
    """`llama_cpp/lib` of the installed package (found without importing llama_cpp)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise EvaluationError(f"{DIST} is not installed; `pip install -e .` installs it")
    d = Path(spec.origin).parent / "lib"
    if not (d / "libllama.so").exists():
        raise EvaluationError(f"{d}: libllama.so is missing; reinstall {DIST}")
    return d


@cache
def ggml_commit() -> str:
    """The llama.cpp commit the installed libraries were built from (7 hex digits), as
    ggml reports it (`ggml_commit()`, set by cmake from the vendored git tree)."""
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    fn = lib.ggml_commit
    fn.restype = ctypes.c_char_p
    text = fn().decode()
    m = re.match(r"^([0-9a-f]{7,40})", text)
    if not m:
        raise EvaluationError(f"ggml_commit() says {text!r}; the installed {DIST} has no commit recorded")
    return m.group(1)


def system_info() -> str:
    """The CPU feature line of the installed libraries (`CPU : SSE3 = 1 | ...`)."""
    lib = ctypes.CDLL(str(lib_dir() / "libllama.so"))
    fn = lib.llama_print_system_info
    fn.restype = ctypes.c_char_p
    return _cpu_features(fn().decode())


def _cpu_features(text: str) -> str:
    m = re.search(r"CPU : [^\n]*", text)
    if not m:
        raise EvaluationError(f"no 'CPU : ...' feature list in {text[:300]!r}")
    return " ".join(m.group(0).split())


def tools_home() -> Path:
    return cache_root() / "llama-tools" / f"{installed_version()}-{ggml_commit()}"


def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a tool runs in: the installed libraries first on the search path,
    then the tools' own helper libraries (llama-common, the tools' -impl libraries)."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(lib_dir()), str(tools_home() / "bin"), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


def find_tool(name: str) -> Path | None:
    """A built tool of the installed llama.cpp, or None. `$QATGGUF_<NAME>` (for example
    QATGGUF_LLAMA_PERPLEXITY) names one explicitly."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    env = os.environ.get("QATGGUF_" + name.upper().replace("-", "_"))
    if env:
        if not Path(env).is_file():
            raise EvaluationError(f"${'QATGGUF_' + name.upper().replace('-', '_')}={env} does not exist")
        return Path(env)
    built = tools_home() / "bin" / name
    return built if built.is_file() else None


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def source_dir() -> Path:
    """The extracted sdist of the installed llama-cpp-python (its `vendor/llama.cpp` holds
    the converter, gguf-py and the tools' sources). Downloaded once with pip into the
    cache; refused when its llama.cpp commit is not the installed libraries' one."""
    version = installed_version()
    root = cache_root() / "llama-tools" / "sdist"
    src = root / f"llama_cpp_python-{version}"
    with _locked(root / ".lock"):
        if not (src / "CMakeLists.txt").is_file():
            root.mkdir(parents=True, exist_ok=True)
            tarball = root / f"llama_cpp_python-{version}.tar.gz"
            if not tarball.is_file():
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      f"{DIST}=={version}", "-d", str(root)], what=f"download the {DIST} {version} sdist")
            tmp = root / f".extract-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            with tarfile.open(tarball) as tf:
                tf.extractall(tmp, filter="data")
            shutil.rmtree(src, ignore_errors=True)
            os.replace(tmp / src.name, src)
            shutil.rmtree(tmp, ignore_errors=True)
    head = src / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    commit = head.read_text().strip() if head.is_file() else ""
    if not commit.startswith(ggml_commit()):
        raise EvaluationError(
            f"{src}: the sdist vendors llama.cpp {commit[:12] or '(unknown)'}, but the installed "
            f"libraries were built from {ggml_commit()}; remove {src} and reinstall {DIST}")
    return src


def vendored_llama_cpp() -> Path:
    """`vendor/llama.cpp` of the installed version's sdist (convert_hf_to_gguf.py lives there)."""
    return source_dir() / "vendor" / "llama.cpp"


def build_options() -> list[str]:
    """The cmake options of the tools' build: llama-cpp-python's CMakeLists.txt with
    `$CMAKE_ARGS` (what pip's build of the wheel honours) and the tool targets."""
    return [*shlex.split(os.environ.get("CMAKE_ARGS", "")), *_TOOL_OPTIONS]


def ensure_tools(*, jobs: int | None = None) -> dict[str, Path]:
    """Every tool in TOOLS, built on first use (minutes on two cores) and cached per
    machine under `tools_home()`. Safe to call from several processes at once."""
    home = tools_home()
    found = {n: find_tool(n) for n in TOOLS}
    if all(found.values()):
        return found  # type: ignore[return-value]
    src = source_dir()
    with _locked(home / ".lock"):
        if all((home / "bin" / n).is_file() for n in TOOLS):
            return {n: home / "bin" / n for n in TOOLS}
        build = home / "build"
        opts = build_options()
        t0 = time.monotonic()
        _run(["cmake", "-S", str(src), "-B", str(build), *opts], what="configure the llama.cpp tools")
        _run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(jobs or os.cpu_count() or 1)],
             what="build the llama.cpp tools")
        bin_tmp = home / f".bin-{os.getpid()}"
        shutil.rmtree(bin_tmp, ignore_errors=True)
        bin_tmp.mkdir(parents=True)
        installed = {p.name for p in lib_dir().iterdir()}
        for f in (build / "bin").iterdir():
            # the tools and the helper libraries the wheel does not ship; never a second
            # copy of libllama or ggml
            if f.is_file() and not f.is_symlink() and f.name.split(".so")[0] + ".so" not in installed:
                shutil.copy2(f, bin_tmp / f.name)
            elif f.is_symlink() and f.name not in installed:
                os.symlink(os.readlink(f), bin_tmp / f.name)
        (bin_tmp / "BUILD.json").write_text(json.dumps({
            "llama_cpp_python": installed_version(), "llama_cpp_commit": ggml_commit(),
            "cmake_options": opts, "seconds": round(time.monotonic() - t0, 1),
            "libraries": str(lib_dir()),
        }, indent=1) + "\n")
        shutil.rmtree(home / "bin", ignore_errors=True)
        os.replace(bin_tmp, home / "bin")
        shutil.rmtree(build, ignore_errors=True)  # the tools run against the installed libraries
    return {n: home / "bin" / n for n in TOOLS}


def _run(cmd: list[str], *, what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise EvaluationError(
            f"cannot {what}: `{' '.join(cmd[:4])} ...` exited {p.returncode}; tail:\n"
            f"{(p.stdout + p.stderr)[-3000:]}")


def main() -> int:
    tools = ensure_tools()
    for n, p in tools.items():
        print(f"{n}: {p}")
    print(f"libraries: {lib_dir()} (llama.cpp {ggml_commit()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
