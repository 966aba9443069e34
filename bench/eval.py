"""Speed of `qatgguf eval` beside llama-perplexity's, both as fresh processes, on a model
whose compute decides: Gemma's 262,144-token vocabulary and a real hidden width.

    python bench/eval.py --workdir /tmp/qatgguf-bench-eval [--size e4b --layers 2]
        [--ctx 512 --chunks 8 --batch 2048 --ubatch 512 --flash-attn auto --threads 2]
        [--quant-recipe q4_0] [--repeat 3]

The model is bench/convert.py's synthetic checkpoint (real widths of --size, --layers
layers, random weights, a 262,144-token tokenizer), converted by `qatgguf convert` to a
BF16 base and a --quant-recipe quant (made once, kept in --workdir). Each round runs,
with the same -c/-b/-ub/-fa/-t and corpus:

  llama-perplexity: the base pass (`--kl-divergence-base`), then the KLD pass, two processes
  ours:             `qatgguf eval --base B --quant Q ... --json`, one process, both passes

and times each from process start to exit, both with OMP_WAIT_POLICY=passive (what our
runner sets for itself). The sides take turns; each figure is the best round. Throughput is corpus tokens (chunks x ctx, both passes) per second; the ratio is
llama-perplexity's time over ours. The two summaries are compared at the tool's printed
precision (every number of its KLD summary; Δp and same top p in percent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qatgguf.evaluate import default_corpus
from qatgguf.evaluate.reference import common_args, llama_perplexity, parse_kld_summary, run_tool

# the summary lines compared: EvalResult.format_table() prints them as llama-perplexity
# does (same decimals), and both are parsed with the same patterns
COMPARED = [
    "ppl_quant",
    "ppl_base",
    "ln_ppl_ratio",
    "mean_kld",
    "kld_max",
    "kld_99_9",
    "kld_median",
    "kld_min",
    "dp_mean",
    "dp_rms",
    "same_top_p",
]


def _bench_convert():
    spec = importlib.util.spec_from_file_location("bench_convert", ROOT / "bench" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare(workdir: Path, size: str, layers: int, quant_recipe: str) -> tuple[Path, Path]:
    """The base and quant GGUFs of the synthetic checkpoint (made once)."""
    ckpt = _bench_convert().build_checkpoint(workdir / f"ckpt-{size}-{layers}L", size, layers)
    out = []
    for recipe in ("bf16", quant_recipe):
        path = workdir / f"{size}-{layers}L-{recipe}.gguf"
        if not path.is_file():
            cmd = [sys.executable, "-m", "qatgguf.cli", "convert", str(ckpt), "-o", str(path)]
            subprocess.run([*cmd, "--recipe", recipe], check=True, stdout=subprocess.DEVNULL)
        out.append(path)
    return out[0], out[1]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    # our runner sets libgomp's passive wait policy for itself (see evaluate/runner.py);
    # the tool gets the same, so both sides run llama.cpp's threads alike on a busy host
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qatgguf-bench-eval"))
    ap.add_argument("--size", default="e4b", help="widths from bench/convert.py SIZES")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quant-recipe", default="q4_0")
    ap.add_argument("--corpus", type=Path, default=default_corpus())
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    base, quant = prepare(a.workdir, a.size, a.layers, a.quant_recipe)
    tool = llama_perplexity()
    common = common_args(
        ctx=a.ctx, batch=a.batch, ubatch=a.ubatch, flash_attn=a.flash_attn, threads=a.threads
    )
    kld_file = a.workdir / "tool-base.kld"
    ours_cmd = [
        sys.executable, "-m", "qatgguf.cli", "eval", "--base", str(base), "--quant", str(quant),
        "--corpus", str(a.corpus), "--ctx", str(a.ctx), "--chunks", str(a.chunks),
        "--batch", str(a.batch), "--ubatch", str(a.ubatch), "--flash-attn", a.flash_attn,
        "--threads", str(a.threads), "--json",
    ]  # fmt: skip

    def tool_base() -> str:
        return run_tool(
            tool,
            ["-m", str(base), "-f", str(a.corpus), "--chunks", str(a.chunks), *common,
             "--kl-divergence-base", str(kld_file)],
            must_contain="Final estimate",
            retries=1,
        )  # fmt: skip

    def tool_kld() -> str:
        return run_tool(
            tool,
            ["-m", str(quant), *common, "--kl-divergence-base", str(kld_file), "--kl-divergence"],
            must_contain="Same top p:",
            retries=1,
        )

    def ours() -> dict:
        p = subprocess.run(ours_cmd, capture_output=True, text=True, check=False)
        if p.returncode:
            raise RuntimeError(f"qatgguf eval failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout)

    best = {"tool_base": float("inf"), "tool_kld": float("inf"), "tool": float("inf"),
            "ours": float("inf")}  # fmt: skip
    loads = []
    text, res = "", {}
    for rnd in range(a.repeat):
        loads.append(os.getloadavg()[0])
        t_b, _ = timed(tool_base)
        t_k, text = timed(tool_kld)
        t_o, res = timed(ours)
        kld_file.unlink()
        for k, v in (("tool_base", t_b), ("tool_kld", t_k), ("tool", t_b + t_k), ("ours", t_o)):
            best[k] = min(best[k], v)
        print(
            f"[{rnd + 1}] llama-perplexity {t_b:.1f} s + {t_k:.1f} s = {t_b + t_k:.1f} s; "
            f"qatgguf eval {t_o:.1f} s; ratio {(t_b + t_k) / t_o:.2f}",
            flush=True,
        )
    tool_sum = parse_kld_summary(text)
    n_tok = 2 * a.chunks * a.ctx
    print(
        f"\nmodel: {a.size} widths, {a.layers} layers, vocab 262144; base {base.name} "
        f"({base.stat().st_size / 1e9:.2f} GB), quant {quant.name} ({quant.stat().st_size / 1e9:.2f} GB)"
    )
    print(
        f"settings: -c {a.ctx} --chunks {a.chunks} -b {a.batch} -ub {a.ubatch} -fa {a.flash_attn} "
        f"-t {a.threads}; best of {a.repeat}; load average at round starts "
        f"{', '.join(f'{x:.1f}' for x in loads)}"
    )
    print(
        f"llama-perplexity: {best['tool']:.1f} s (base pass {best['tool_base']:.1f} s, KLD pass "
        f"{best['tool_kld']:.1f} s), {n_tok / best['tool']:.0f} tok/s"
    )
    print(f"qatgguf eval:     {best['ours']:.1f} s, {n_tok / best['ours']:.0f} tok/s")
    print(f"ratio (llama-perplexity time / ours): {best['tool'] / best['ours']:.2f}x\n")
    from qatgguf.evaluate.result import EvalResult

    ours_sum = parse_kld_summary(EvalResult(**res).format_table())
    differ = [k for k in tool_sum if ours_sum[k] != tool_sum[k]]
    print(
        f"every printed summary number equal: {'yes' if not differ else 'NO'}"
        + "".join(
            f"\n  {k}: llama-perplexity {tool_sum[k]!r}, ours {ours_sum[k]!r}" for k in differ
        )
    )
    print(f"{'statistic':<14}{'llama-perplexity':>18}{'qatgguf':>18}")
    for name in COMPARED:
        scale = 100.0 if name.startswith("dp_") or name == "same_top_p" else 1.0
        print(f"{name:<14}{scale * tool_sum[name]:>18.6f}{scale * ours_sum[name]:>18.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
