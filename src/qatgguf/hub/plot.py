"""The model card's plot: the per-token KL divergence of the aligned file against the naive
one, as two histograms over log-spaced bins, each with its mean and 99.9th percentile.

The PNG carries no time stamp or version text, so the same values give the same bytes
and an unchanged release uploads nothing new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qatgguf.errors import ModelCardError
from qatgguf.files import atomic_output

# KL(p||q) >= 0, and llama.cpp's per-token sums can round to 0 or a hair below; the log
# axis starts here.
KLD_FLOOR = 1e-7
_BINS = 60
_COLORS = ("#1f77b4", "#d62728")


def _check(name: str, values: np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ModelCardError(f"KLD plot: no per-token values for {name!r}; evaluate it first")
    if not np.all(np.isfinite(a)):
        raise ModelCardError(
            f"KLD plot: per-token KLD of {name!r} holds NaN or Inf; the evaluation is broken"
        )
    return a


def plot_kld_distribution(
    aligned: np.ndarray,
    naive: np.ndarray,
    out: str | Path,
    *,
    aligned_label: str,
    naive_label: str,
    title: str,
) -> Path:
    """Write the PNG to `out` (atomically) and return its path.

    `aligned` and `naive` are the per-token KLD values of the two files against the same
    BF16 base (`TokenValues.kld` of each file's merged evaluation). Raises ModelCardError
    on empty or non-finite input.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    series = [
        (aligned_label, _check(aligned_label, aligned)),
        (naive_label, _check(naive_label, naive)),
    ]
    hi = max(float(np.max(v)) for _, v in series)
    edges = np.geomspace(KLD_FLOOR, max(hi, KLD_FLOOR * 10) * 1.05, _BINS + 1)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    try:
        for (label, values), color in zip(series, _COLORS, strict=True):
            clipped = np.clip(values, KLD_FLOOR, None)
            weights = np.full(clipped.size, 100.0 / clipped.size)
            mean = float(values.mean())
            p999 = float(np.percentile(values, 99.9))
            ax.hist(
                clipped,
                bins=edges,
                weights=weights,
                histtype="step",
                linewidth=1.6,
                color=color,
                label=f"{label}: mean {mean:.5f}, 99.9% {p999:.4f}",
            )
            ax.axvline(max(mean, KLD_FLOOR), color=color, linestyle="--", linewidth=1.0)
            ax.axvline(max(p999, KLD_FLOOR), color=color, linestyle=":", linewidth=1.0)
        ax.set_xscale("log")
        ax.set_xlabel("per-token KL divergence against BF16 (log scale)")
        ax.set_ylabel("share of scored tokens (%)")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        ax.grid(True, which="major", alpha=0.3)
        fig.text(0.99, 0.01, "dashed: mean, dotted: 99.9th percentile", ha="right", fontsize=7)
        fig.tight_layout()
        out = Path(out)
        with atomic_output(out) as tmp:
            # No Software/time metadata: equal values give equal bytes.
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return out
