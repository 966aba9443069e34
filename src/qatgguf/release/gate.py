"""Release step: the gate decision for one file, stored beside its numbers."""

from __future__ import annotations

from qatgguf.config import GateConfig
from qatgguf.release.context import ReleaseContext
from qatgguf.release.refs import GGUFOutput


def gate(ctx: ReleaseContext, *, model: str, recipe: str, result: dict, quant: GGUFOutput,
         thresholds: GateConfig, naive_result: dict | None = None, naive: GGUFOutput | None = None) -> dict:
    """Apply the release gate and store the decision beside the numbers (and the size of
    the file they describe). With a naive baseline (`naive_result`, `naive`), the file
    must also have a lower mean KLD than it and be no larger."""
    from qatgguf.evaluate import EvalResult, apply_gate, beats_baseline

    result = {**result, "quant_size": quant.size, "quant_sha256": quant.sha256}
    numbers = {k: v for k, v in result.items() if k in EvalResult.__dataclass_fields__}
    decision = apply_gate(EvalResult(**numbers), thresholds)
    if naive_result is not None and naive is not None:
        base = {k: v for k, v in naive_result.items() if k in EvalResult.__dataclass_fields__}
        decision = beats_baseline(decision, EvalResult(**numbers), quant.size, EvalResult(**base), naive.size)
    data = {"model": model, "recipe": recipe, **decision.to_dict(), "thresholds": thresholds.model_dump(),
            "result": result}
    ctx.store().put_json(data, ctx.key(model, f"gate-{recipe}.json"))
    return data
