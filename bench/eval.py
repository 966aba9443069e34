"""Speed of our KLD evaluation beside llama-perplexity's, on the same files and threads.

    python bench/eval.py [--base B.gguf --quant Q.gguf] [--ctx 128 --chunks 64 --batch 512 --threads 2]

Both sides run the same two passes (base log-probs, then KLD of the quant) with the same
-c/-b/-ub/-fa/-t; each pass is timed from process or model load to the summary, best of
--repeat. Throughput is corpus tokens evaluated (chunks x ctx) per second of wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qatgguf.evaluate import (
    RunnerSettings,
    compute_base_records,
    default_corpus,
    evaluate_chunks,
    merge,
)
from qatgguf.evaluate.reference import common_args, llama_perplexity, parse_kld_summary, run_tool

MODELS = ROOT / "tests" / "evaluate" / "golden" / "models"


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=MODELS / "tiny-bf16.gguf")
    ap.add_argument("--quant", type=Path, default=MODELS / "tiny-q4_0.gguf")
    ap.add_argument("--corpus", type=Path, default=default_corpus())
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--flash-attn", default="off", choices=("auto", "on", "off"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tool", type=Path, default=None)
    a = ap.parse_args()
    tool = a.tool or llama_perplexity()
    common = common_args(
        ctx=a.ctx, batch=a.batch, ubatch=a.ubatch, flash_attn=a.flash_attn, threads=a.threads
    )
    s = RunnerSettings(
        n_batch=a.batch, n_ubatch=a.ubatch, flash_attn=a.flash_attn, n_threads=a.threads
    )
    n_tok = a.chunks * a.ctx
    with tempfile.TemporaryDirectory() as tmp:
        kld = Path(tmp) / "base.kld"
        t_tool_base, _ = best(
            lambda: run_tool(
                tool,
                [
                    "-m",
                    str(a.base),
                    "-f",
                    str(a.corpus),
                    "--chunks",
                    str(a.chunks),
                    *common,
                    "--kl-divergence-base",
                    str(kld),
                ],
                must_contain="Final estimate",
            ),
            a.repeat,
        )
        t_tool_kld, text = best(
            lambda: run_tool(
                tool,
                ["-m", str(a.quant), *common, "--kl-divergence-base", str(kld), "--kl-divergence"],
                must_contain="Same top p:",
            ),
            a.repeat,
        )
        counter = iter(range(10**6))
        t_our_base, rec = best(
            lambda: compute_base_records(
                a.base,
                a.corpus,
                ctx=a.ctx,
                chunks=a.chunks,
                settings=s,
                out=Path(tmp) / f"ours-{next(counter)}.qgkl",
            ),
            a.repeat,
        )
        t_our_kld, res = best(lambda: merge([evaluate_chunks(a.quant, rec, settings=s)]), a.repeat)
    tool_sum = parse_kld_summary(text)
    print(
        f"files: base {a.base.name} ({a.base.stat().st_size} B), quant {a.quant.name}; ctx {a.ctx}, chunks {a.chunks}, "
        f"-b {a.batch} -ub {a.ubatch} -fa {a.flash_attn} -t {a.threads}; best of {a.repeat}"
    )
    print(f"{'pass':<10}{'llama-perplexity':>20}{'qatgguf':>14}{'ratio':>8}")
    for name, tt, to in (("base", t_tool_base, t_our_base), ("kld", t_tool_kld, t_our_kld)):
        print(f"{name:<10}{n_tok / tt:>14,.0f} tok/s{n_tok / to:>8,.0f} tok/s{tt / to:>8.2f}x")
    print(
        f"mean KLD: tool {tool_sum['mean_kld']:.6f}, ours {res.mean_kld:.6f}; same top p: tool "
        f"{100 * tool_sum['same_top_p']:.3f}%, ours {100 * res.same_top_p:.3f}%"
    )


if __name__ == "__main__":
    main()
