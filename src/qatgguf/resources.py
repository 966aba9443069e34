"""What a step costs: the memory and time it is planned to need, and what it used.

The estimates come from the plan (tensor and file sizes), so a scheduler can place a task
where it fits (Ray's `memory` resource) and give it a timeout; `measure()` records the
peak resident memory and seconds of a step so the two can be compared.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

MiB = 1024 * 1024
# A worker process with numpy, numba, the kernels and llama.cpp's libraries loaded
# (measured: 0.5 GB peak for a shard task with almost nothing to convert, 0.6-0.7 GB for
# the converter on a 31B-width checkpoint; bench/RESULTS.md, "Cluster model" and "Converter").
PROCESS_BASE = 768 * MiB


@dataclass
class StepStats:
    """Seconds, peak RSS and bytes fetched of one step run; `reused` when the step found
    its output in the store and did no work."""

    seconds: float = 0.0
    peak_rss: int = 0
    fetched: int = 0
    reused: bool = False
    host: str = field(default_factory=socket.gethostname)

    def to_dict(self) -> dict:
        return asdict(self)


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM), so that a long-lived worker reports the peak
    of the current step. ref: Linux proc(5), /proc/pid/clear_refs, value 5."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measure() -> Iterator[StepStats]:
    """Time a step and record its peak RSS into the yielded `StepStats`."""
    stats = StepStats()
    exact = _reset_peak()
    t0 = time.monotonic()
    try:
        yield stats
    finally:
        stats.seconds = round(time.monotonic() - t0, 3)
        peak = _vm_hwm() if exact else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process lifetime
        stats.peak_rss = int(peak)


@dataclass(frozen=True)
class TaskBudget:
    """What a task is declared to need: memory (bytes), scratch disk (bytes), timeout (s)."""

    memory: int
    disk: int
    timeout: int

    def to_dict(self) -> dict:
        return asdict(self)


def _timeout(fixed: float, nbytes: int, rate: float) -> int:
    return int(fixed + nbytes / rate)


def shard_budget(*, shard_bytes: int, largest_tensor: int, part_bytes: int, row_block: int) -> TaskBudget:
    """A shard task: one block of rows of the largest tensor as read, widened to f32 and
    quantized, plus the process; disk holds the shard and its parts. Throughput floor of
    20 MB/s for fetch, conversion and upload together."""
    block = min(largest_tensor, row_block)
    return TaskBudget(memory=PROCESS_BASE + 6 * block, disk=shard_bytes + part_bytes,
                      timeout=_timeout(300, shard_bytes + part_bytes, 20e6))


def assemble_budget(*, gguf_bytes: int) -> TaskBudget:
    """Assembly streams parts into the file: memory is flat, disk holds parts and file."""
    return TaskBudget(memory=PROCESS_BASE + 64 * MiB, disk=2 * gguf_bytes,
                      timeout=_timeout(300, 2 * gguf_bytes, 50e6))


def eval_budget(*, gguf_bytes: int, n_ctx: int, n_seq: int, n_vocab: int, records_bytes: int,
                chunks: int, n_ubatch: int = 512) -> TaskBudget:
    """Evaluation maps the model (its pages count as resident), keeps a batch of logits
    (n_seq x n_ctx x n_vocab floats, twice while they are scored), llama.cpp's compute
    buffer and the base records."""
    logits = 2 * n_seq * n_ctx * n_vocab * 4
    # the compute buffer holds the graph's output, one micro-batch of logits
    # (ref: llama.cpp src/llama-context.cpp, llama_context::graph_reserve sizes it for
    # n_ubatch outputs); bench/cluster.py measured a 262k-vocabulary range task 0.3 GB
    # above the estimate without it
    compute = min(n_ubatch, n_seq * n_ctx) * n_vocab * 4
    return TaskBudget(memory=PROCESS_BASE + gguf_bytes + logits + compute + records_bytes + 256 * MiB,
                      disk=gguf_bytes + records_bytes,
                      timeout=_timeout(600, gguf_bytes * max(1, chunks // max(1, n_seq)), 200e6))


def plan_budget(*, small_files: int) -> TaskBudget:
    """Planning holds the tokenizer (parsed several times by transformers and gguf-py)."""
    return TaskBudget(memory=PROCESS_BASE + 512 * MiB + 8 * small_files, disk=small_files,
                      timeout=_timeout(600, small_files, 5e6))


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
