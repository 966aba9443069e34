"""The card's content computed from a release's results: plain data in (gate decisions,
GGUF facts, the manifest), card parts out. Nothing here reads a store or the network, so
the release step (`qatgguf.release.publish_model`) only fetches and passes.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from qatgguf.errors import ModelCardError
from qatgguf.evaluate.tables import EvalTable, MethodResult, comparison_rows
from qatgguf.evaluate.tables import comparison_table as _table
from qatgguf.hub.card import CardFile, EvalMethod, RunInfo, Sampling
from qatgguf.hub.facts import ModelFacts
from qatgguf.hub.manifest import Manifest

PLOT_PATH = "kld-per-token.png"
# Where the license texts of the Hub's non-SPDX license ids live, for configs that name
# the id but no link.
LICENSE_LINKS = {"gemma": "https://ai.google.dev/gemma/terms"}


def license_link(license_id: str, configured: str | None) -> str | None:
    """The configured link, else the known one for the license id (None for SPDX ids)."""
    return configured or LICENSE_LINKS.get(license_id)


def run_info(facts: ModelFacts, *, context: int) -> RunInfo:
    """Sampling, thinking switch, maximum context and the KV cache at `context` (capped at
    the model's maximum) and at the maximum context, all from the GGUF's metadata."""
    ctx = min(context, facts.context_length)
    contexts = sorted({ctx, facts.context_length})
    return RunInfo(
        max_context=facts.context_length,
        context=ctx,
        kv_cache=tuple((c, facts.kv_cache_bytes(c)) for c in contexts),
        kv_formula=facts.kv_formula(),
        sampling=Sampling(
            temperature=facts.temperature, top_p=facts.top_p, top_k=facts.top_k,
            min_p=facts.min_p,
        ),
        thinking_switch=facts.thinking_switch,
    )


def method_label(recipe: str, label: str, *, aligned: str | None, naive: str | None) -> str:
    if recipe == aligned:
        return f"{label} (aligned)"
    if recipe == naive:
        return f"{label} (naive)"
    return label


def comparison_table(
    model: str,
    gates: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, str],
    *,
    aligned: str | None,
    naive: str | None,
) -> EvalTable:
    """The naive-against-aligned table of one model: one row per evaluated recipe, the
    aligned first, then the naive, then the rest; failed gates are marked."""
    order = [r for r in (aligned, naive) if r in gates] + [r for r in gates if r not in (aligned, naive)]
    rows = comparison_rows(model, [
        MethodResult(method_label(r, labels[r], aligned=aligned, naive=naive), int(gates[r]["result"]["quant_size"]),
                     gates[r]["result"], passed=bool(gates[r].get("passed")))
        for r in order])
    note = (
        "KL divergence of each file's next-token distributions against the BF16 GGUF of the "
        "same QAT checkpoint (lower is better), and the share of tokens whose most likely "
        "token agrees with BF16 (higher is better)."
    )
    if aligned in gates and naive in gates:
        note += (
            f" *naive*: {labels[naive]} as llama.cpp's quantizer writes it from the BF16 "
            f"file; *aligned*: {labels[aligned]}, with the tensors kept on the grid the "
            "model was trained on."
        )
    return _table(rows, note=note)


def eval_method(
    result: Mapping[str, Any],
    *,
    corpus: str,
    llama_cpp_commit: str,
    base_file: str,
    quant_file: str,
    batch: int,
    ubatch: int = 512,
    flash_attn: str = "auto",
) -> EvalMethod:
    """The method section: corpus, context, chunks, scored tokens, llama.cpp commit and
    the two llama-perplexity commands that reproduce `quant_file`'s row.
    ref: tools/perplexity/perplexity.cpp (--kl-divergence-base writes the base logits,
    --kl-divergence reads them back; -f is not needed the second time)."""
    if not result.get("corpus_sha256"):
        raise ModelCardError(
            f"evaluation of {quant_file}: the result has no corpus sha256; re-run the evaluation"
        )
    ctx, n_chunks = int(result["ctx"]), int(result["n_chunks"])
    # llama.cpp clamps the micro-batch to the batch; say what actually runs.
    common = ["-c", str(ctx), "-b", str(batch), "-ub", str(min(ubatch, batch)), "-fa", flash_attn]
    q = shlex.quote
    first = ["llama-perplexity", "-m", base_file, "-f", corpus, "--chunks", str(n_chunks),
             *common, "--kl-divergence-base", "bf16.kld"]
    second = ["llama-perplexity", "-m", quant_file, *common, "--kl-divergence-base",
              "bf16.kld", "--kl-divergence"]
    return EvalMethod(
        corpus=corpus,
        corpus_sha256=str(result["corpus_sha256"]),
        ctx=ctx,
        n_chunks=n_chunks,
        n_tokens=int(result["n_tokens"]),
        llama_cpp_commit=llama_cpp_commit,
        commands=(" ".join(q(a) for a in first), " ".join(q(a) for a in second)),
    )


def card_files(
    manifest: Manifest,
    *,
    release_id: str,
    failed: Mapping[str, Sequence[str]],
) -> tuple[CardFile, ...]:
    """The card's file list from the manifest the repo will hold: each file with the
    release it comes from, and for a file an earlier release left, why it stays."""
    out = []
    for e in manifest.entries:
        if e.kind == "asset":
            continue
        note = ""
        if e.release != release_id:
            if e.recipe in failed:
                note = f"kept: release {release_id} built {e.recipe} but it failed the gate"
            else:
                note = f"kept: release {release_id} did not build {e.recipe}"
        out.append(
            CardFile(
                path=e.path,
                size=e.size,
                quant=e.quant,
                kind="mmproj" if e.kind == "mmproj" else "model",
                sha256=e.sha256,
                release=e.release,
                note=note,
            )
        )
    return tuple(out)
