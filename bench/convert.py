"""Converter benchmark: a synthetic multi-GB checkpoint with real Gemma 4 widths (few layers).

Measures, each in its own process (peak RSS from the kernel's ru_maxrss):
  ours:     qatgguf convert -> BF16, Q8_0, Q4_0, UD-Q4_K_XL
  baseline: vendored convert_hf_to_gguf.py --outtype bf16, then llama-quantize (through
            llama_cpp.llama_model_quantize, byte-identical to the CLI) to Q8_0 and Q4_0;
            UD-Q4_K_XL (a Q4_0 file) is compared with the same Q4_0 pipeline
and prints seconds, MB/s and the throughput ratio, plus peak memory against the largest
tensor (goal: peak <= 2 x largest tensor + a constant).

    python bench/convert.py --workdir /tmp/qatgguf-bench [--size 31b] [--layers 2] [--repeat 2]
        [--weights grid|random]

The weights lie on a QAT Q4_0 grid as a QAT export's do (`--weights grid`, the default:
learned per-block scales, see `_grid_weights`), so UD-Q4_K_XL's grid search does the
work it does on a real checkpoint; `--weights random` gives plain Gaussian bf16 weights.
With --repeat N, ours and the baseline take turns N times and each figure is the best.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

SIZES = {
    # real widths (each size's released config.json): hidden, heads, kv, global kv, ff
    "31b": dict(hidden_size=5376, num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
                intermediate_size=21504, attention_k_eq_v=True),
    "e4b": dict(hidden_size=2560, num_attention_heads=8, num_key_value_heads=2, num_global_key_value_heads=None,
                intermediate_size=10240, attention_k_eq_v=False),
}
VOCAB = 262144
CHUNK = 32 * 1024 * 1024
# the llama-quantize type each recipe is compared with (None: the converter's BF16 alone)
BASELINE = {"bf16": None, "q8_0": "q8_0", "q4_0": "q4_0", "UD-Q4_K_XL": "q4_0"}


def _tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
    pieces = specials + [f"<0x{i:02X}>" for i in range(256)]
    # printable ASCII and "▁", then merged pairs (llama.cpp's BPE vocab needs merges):
    # "▁" + letter and letter + letter; the rest of the vocabulary is filler pieces
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["▁"] + [chr(c) for c in range(0x21, 0x7F)]
    merges = [("▁", c) for c in letters] + [(a, b) for a in letters for b in letters]
    pieces += [a + b for a, b in merges]
    pieces += [f"▁w{i}" for i in range(vocab - len(pieces))]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", additional_special_tokens=specials[5:])
    fast.save_pretrained(out)


def _tensors(cfg: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, hd, ghd = cfg["hidden_size"], 256, 512
    t = [("model.embed_tokens.weight", (VOCAB, h)), ("model.norm.weight", (h,))]
    for i, kind in enumerate(cfg["layer_types"]):
        full = kind == "full_attention"
        d = ghd if full else hd
        kv = (cfg["num_global_key_value_heads"] or cfg["num_key_value_heads"]) if full and cfg["attention_k_eq_v"] \
            else cfg["num_key_value_heads"]
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
              (p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,)),
              (p + "layer_scalar", (1,)),
              (p + "self_attn.q_proj.weight", (cfg["num_attention_heads"] * d, h)),
              (p + "self_attn.k_proj.weight", (kv * d, h)),
              (p + "self_attn.o_proj.weight", (h, cfg["num_attention_heads"] * d)),
              (p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
              (p + "mlp.gate_proj.weight", (cfg["intermediate_size"], h)),
              (p + "mlp.up_proj.weight", (cfg["intermediate_size"], h)),
              (p + "mlp.down_proj.weight", (h, cfg["intermediate_size"]))]
        if not (full and cfg["attention_k_eq_v"]):
            t.append((p + "self_attn.v_proj.weight", (kv * d, h)))
    return t


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (finite input)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _grid_weights(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A QAT export's weights on the Q4_0 grid, learned-scale style: per block of 32, a
    bf16 scale d = absmax / t with t drawn from [6, 8.5] (so d is absmax/8 only by
    chance and the block maximum carries code 6, 7 or 8), codes q = clip(rint(x/d), -8, 7),
    weights w = bf16(d * q). Returns bf16 bits."""
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    t = rng.uniform(6.0, 8.5, amax.shape).astype(np.float32)
    d = (_bf16(amax / t).astype(np.uint32) << np.uint32(16)).view(np.float32)
    d = np.where(d > 0, d, np.float32(1e-3))
    q = np.clip(np.rint(b / d), -8, 7).astype(np.float32)
    return _bf16(d * q).reshape(-1)


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator,
                 weights: str = "random") -> None:
    header, off = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        for name, shape in tensors:
            n = math.prod(shape)
            norm = len(shape) == 1
            for a in range(0, n, CHUNK // 2):
                m = min(CHUNK // 2, n - a)
                x = (rng.uniform(0.5, 1.5, m) if norm else rng.standard_normal(m) * 0.02).astype(np.float32)
                if weights == "grid" and not norm and m % 32 == 0:
                    fh.write(_grid_weights(x, rng).tobytes())
                else:
                    fh.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def build_checkpoint(out: Path, size: str, layers: int, shard_bytes: int = 2 * 1024**3,
                     weights: str = "random") -> Path:
    """The synthetic checkpoint (made once): random bf16 weights, or (`weights="grid"`)
    weights on a QAT Q4_0 grid as a QAT export holds them (`_grid_weights`)."""
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(SIZES[size])
    cfg["layer_types"] = (["sliding_attention"] * (layers - 1) + ["full_attention"])
    config = dict(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", vocab_size=VOCAB,
                  vocab_size_per_layer_input=VOCAB, num_hidden_layers=layers, head_dim=256, global_head_dim=512,
                  hidden_size_per_layer_input=0, sliding_window=1024, max_position_embeddings=262144,
                  final_logit_softcapping=30.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                  tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2, torch_dtype="bfloat16",
                  **cfg)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = _tensors(config, layers)
    groups, cur, size_ = [], [], 0
    for t in tensors:
        n = math.prod(t[1]) * 2
        if cur and size_ + n > shard_bytes:
            groups.append(cur)
            cur, size_ = [], 0
        cur.append(t)
        size_ += n
    groups.append(cur)
    rng = np.random.default_rng(0)
    wm = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(out / name, g, rng, weights)
        wm.update({t[0]: name for t in g})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    _tokenizer(out, VOCAB)
    return out


def _peak_child(cmd: list[str]) -> tuple[float, float]:
    # ru_maxrss of RUSAGE_CHILDREN is the max over all children so far: measure in a fresh
    # wrapper process so each number is its own
    wrapper = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:]);"
               "print(json.dumps([time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, r.returncode]))")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=False)
    dt, peak, rc = json.loads(p.stdout.strip().splitlines()[-1])
    if rc:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{p.stderr[-3000:]}")
    return dt, peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qatgguf-bench"))
    ap.add_argument("--size", default="31b", choices=sorted(SIZES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--llama-cpp-src", type=Path,
                    default=None, help="llama.cpp source (default: the installed llama-cpp-python's)")
    ap.add_argument("--recipes", default="bf16,q8_0,q4_0,UD-Q4_K_XL")
    ap.add_argument("--weights", default="grid", choices=("grid", "random"))
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF outputs")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of (ours, baseline); each figure is the best round")
    args = ap.parse_args()
    tag = "" if args.weights == "random" else f"-{args.weights}"
    ckpt = build_checkpoint(args.workdir / f"ckpt-{args.size}-{args.layers}L{tag}", args.size, args.layers,
                            weights=args.weights)
    src_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    from qatgguf.convert.safetensors import read_header
    from qatgguf.llamacpp import vendored_llama_cpp

    largest = max(e.nbytes for p in ckpt.glob("*.safetensors") for e in read_header(p).tensors.values())
    print(f"checkpoint {ckpt}: {src_bytes / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB")
    out = args.workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ours: dict[str, tuple[float, float]] = {}
    conv_best: tuple[float, float] | None = None
    quant_best: dict[str, tuple[float, float]] = {}

    def keep_best(d: dict, key: str, val: tuple[float, float]) -> None:
        if key not in d or val[0] < d[key][0]:
            d[key] = val

    for rnd in range(args.repeat):
        for r in args.recipes.split(","):
            dt, peak = _peak_child([sys.executable, "-m", "qatgguf.cli", "convert", str(ckpt), "-o",
                                    str(out / f"ours-{r}.gguf"), "--recipe", r])
            keep_best(ours, r, (dt, peak))
            print(f"[{rnd + 1}] ours {r}: {dt:.1f} s, {src_bytes / dt / 1e6:.0f} MB/s, peak RSS {peak:.0f} MB",
                  flush=True)
            if not args.keep or rnd + 1 < args.repeat:
                (out / f"ours-{r}.gguf").unlink()
        if args.skip_baseline:
            continue
        conv = (args.llama_cpp_src or vendored_llama_cpp()) / "convert_hf_to_gguf.py"
        dt_c, peak_c = _peak_child([sys.executable, str(conv), str(ckpt), "--outtype", "bf16", "--outfile",
                                    str(out / "ref-bf16.gguf")])
        if conv_best is None or dt_c < conv_best[0]:
            conv_best = (dt_c, peak_c)
        print(f"[{rnd + 1}] baseline convert bf16: {dt_c:.1f} s, peak RSS {peak_c:.0f} MB", flush=True)
        qscript = ("import ctypes,sys,llama_cpp;p=llama_cpp.llama_model_quantize_default_params();"
                   "p.ftype=getattr(llama_cpp,'LLAMA_FTYPE_MOSTLY_'+sys.argv[3]);p.nthread=os.cpu_count();"
                   "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(),sys.argv[2].encode(),ctypes.byref(p)))")
        qscript = "import os;" + qscript
        for r in sorted({BASELINE[r] for r in args.recipes.split(",")} - {None}):
            dt_q, peak_q = _peak_child([sys.executable, "-c", qscript, str(out / "ref-bf16.gguf"),
                                        str(out / f"ref-{r}.gguf"), r.upper()])
            keep_best(quant_best, r, (dt_q, peak_q))
            print(f"[{rnd + 1}] baseline quantize {r}: {dt_q:.1f} s (+ convert {dt_c:.1f} s), peak {peak_q:.0f} MB",
                  flush=True)
            if not args.keep or rnd + 1 < args.repeat:
                (out / f"ref-{r}.gguf").unlink()
        if not args.keep or rnd + 1 < args.repeat:
            (out / "ref-bf16.gguf").unlink()
    if conv_best is not None:
        dt_c = conv_best[0]
        print("\nrecipe | ours s (peak RSS) | baseline s (convert + quantize; peak RSS) | speed-up")
        for r in args.recipes.split(","):
            b = BASELINE[r]
            base = dt_c + (0 if b is None else quant_best[b][0])
            how = f"{dt_c:.1f}" + ("" if b is None else f" + {quant_best[b][0]:.1f} {b.upper()}")
            peaks = f"{conv_best[1]:.0f}" + ("" if b is None else f" / {quant_best[b][1]:.0f}")
            print(f"{r} | {ours[r][0]:.1f} ({ours[r][1]:.0f} MB) | {base:.1f} ({how}; {peaks} MB) | "
                  f"{base / ours[r][0]:.2f}x")
    print(f"\npeak RSS vs 2 x largest tensor ({2 * largest / 1e6:.0f} MB): "
          + ", ".join(f"{r} {p:.0f} MB" for r, (_, p) in ours.items()))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
