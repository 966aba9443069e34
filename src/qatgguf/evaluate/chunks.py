"""How the corpus is cut into chunks: how many llama-perplexity evaluates, and the
chunk ranges of an evaluation split over tasks."""

from __future__ import annotations

from pathlib import Path

from qatgguf.errors import EvaluationError
from qatgguf.evaluate.runner import read_corpus_text


def check_corpus_len(corpus: Path, n_tokens: int, ctx: int) -> None:
    if n_tokens < 2 * ctx:
        # ref: perplexity.cpp "you need at least %d tokens to evaluate perplexity with a context of %d"
        raise EvaluationError(
            f"{corpus}: tokenizes to only {n_tokens} tokens; a context of {ctx} needs at least {2 * ctx} "
            f"(two chunks, as llama-perplexity requires); use a longer corpus or a smaller --ctx"
        )


def resolve_range(
    n_chunks: int, chunk_range: tuple[int, int] | None, what: str
) -> tuple[int, int]:
    a, b = chunk_range if chunk_range is not None else (0, n_chunks)
    if not (0 <= a < b <= n_chunks):
        raise EvaluationError(
            f"{what}: chunk range [{a}, {b}) is not inside [0, {n_chunks}); pick a range within it"
        )
    return a, b


def plan_chunk_ranges(n_chunks: int, *, n_parts: int, n_seq: int = 1) -> list[tuple[int, int]]:
    """Cut [0, n_chunks) into at most n_parts contiguous ranges whose starts are multiples of
    n_seq, so each range batches its chunks as a whole-corpus run does (same logits)."""
    if n_chunks < 1 or n_parts < 1 or n_seq < 1:
        raise EvaluationError(
            f"plan_chunk_ranges needs n_chunks, n_parts, n_seq >= 1, got {n_chunks}, {n_parts}, {n_seq}"
        )
    groups = -(-n_chunks // n_seq)
    n_parts = min(n_parts, groups)
    bounds = [round(k * groups / n_parts) * n_seq for k in range(n_parts + 1)]
    bounds[-1] = n_chunks
    return [(bounds[k], bounds[k + 1]) for k in range(n_parts)]


def count_chunks(base_gguf: Path, corpus: Path, *, ctx: int, chunks: int | None = None) -> int:
    """Number of ctx-token chunks llama-perplexity would evaluate (`--chunks` caps it)."""
    import llama_cpp

    from qatgguf.evaluate.runner import quiet_llama

    quiet_llama()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(base_gguf).encode(), mp)
    if not model:
        raise EvaluationError(f"{base_gguf}: llama.cpp could not load this GGUF's vocabulary")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        raw = read_corpus_text(corpus).encode("utf-8")
        n = -llama_cpp.llama_tokenize(vocab, raw, len(raw), None, 0, True, False)
    finally:
        llama_cpp.llama_model_free(model)
    check_corpus_len(corpus, n, ctx)
    return min(n // ctx, chunks) if chunks else n // ctx
