"""Row kernels over a batch of rows on several threads (the kernels release the GIL)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def default_threads() -> int:
    """Threads for the per-row work when the settings name none: llama-perplexity shares it
    among all CPUs (ref: perplexity.cpp `std::thread::hardware_concurrency()` workers);
    here OMP_NUM_THREADS when set (Ray sets it to a task's CPUs), else the CPUs this
    process may run on."""
    from qatgguf.quant.api import default_threads as cpus

    return cpus()


class RowWork:
    """Runs a row kernel over a batch of rows on `threads` threads (the kernels release
    the GIL), each thread on its own rows with its own scratch (`kernels.scratch`)."""

    def __init__(self, n_vocab: int, threads: int) -> None:
        from qatgguf.evaluate import kernels

        self.threads = max(1, threads)
        self.port = kernels.use_port()
        self.with_fma = kernels.WITH_FMA
        self._scratch = [kernels.scratch(n_vocab) for _ in range(self.threads)]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def run(self, n: int, fn: Callable[[np.ndarray, int, int], None]) -> None:
        """fn(scratch, r0, r1) over [0, n) cut into one contiguous part per thread."""
        parts = [(n * k // self.threads, n * (k + 1) // self.threads) for k in range(self.threads)]
        parts = [(k, a, b) for k, (a, b) in enumerate(parts) if b > a]
        if self._pool is None or len(parts) == 1:
            for k, a, b in parts:
                fn(self._scratch[k], a, b)
            return
        for f in [self._pool.submit(fn, self._scratch[k], a, b) for k, a, b in parts]:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
