"""`qatgguf eval`: KLD / top-1 / PPL of a quantized GGUF against its base, as
`llama-perplexity --kl-divergence` computes them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a quantized GGUF against its base (KLD, same top p, PPL)",
        description=__doc__,
    )
    p.add_argument("--base", type=Path, required=True, help="base GGUF (the QAT BF16 file)")
    p.add_argument("--quant", type=Path, required=True, help="quantized GGUF to evaluate")
    p.add_argument(
        "--corpus", type=Path, default=None, help="UTF-8 text file (default: the shipped corpus)"
    )
    p.add_argument(
        "--ctx", type=int, default=512, help="tokens per chunk, llama-perplexity's -c (default 512)"
    )
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks")
    p.add_argument(
        "--batch",
        type=int,
        default=2048,
        help="llama-perplexity's -b: ctx-chunks per batch = batch/ctx",
    )
    p.add_argument("--ubatch", type=int, default=512, help="llama-perplexity's -ub")
    p.add_argument(
        "--flash-attn", choices=("auto", "on", "off"), default="auto", help="llama-perplexity's -fa"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (llama-perplexity's -t)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep base records here and reuse them"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qatgguf.evaluate import RunnerSettings, default_corpus, evaluate

    settings = RunnerSettings(
        n_batch=args.batch, n_ubatch=args.ubatch, flash_attn=args.flash_attn, n_threads=args.threads
    )
    corpus = args.corpus or default_corpus()
    result = evaluate(
        args.base,
        args.quant,
        corpus,
        ctx=args.ctx,
        chunks=args.chunks,
        workdir=args.workdir,
        settings=settings,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.format_table())
    return 0
