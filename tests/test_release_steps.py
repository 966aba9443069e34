"""The release steps without orchestration: gate failures never publish; base records are
computed once per base file and reused by every later quant and release."""

from __future__ import annotations

import logging

import pytest

from qatgguf import release as core
from qatgguf.config import GateConfig, ModelConfig, parse_release_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_family):
    """31B converted to BF16 and Q4_0 through the shard steps, into a local store."""
    root = tmp_path_factory.mktemp("release")
    raw = {
        "version": 1,
        "family": "t",
        "recipes": ["q4_0"],
        "models": [
            {"name": "31B", "source": str(tiny_family["31B"]), "repo": "org/m-GGUF", "file_prefix": "m"}
        ],
        "store": {"url": str(root / "store")},
        "publish": {"target": "local", "local_root": str(root / "hub")},
    }
    cfg = parse_release_config(raw)
    model = cfg.models[0]
    ctx = core.ReleaseContext("t", "r1", cfg.store.url)
    plan = core.plan_model(ctx, model, ("bf16", "q4_0"))
    parts = [core.run_shard(ctx, model.name, plan.plans, i) for i in range(plan.n_shards)]
    files = {r: core.assemble_model(ctx, model, r, plan.plans[r], parts) for r in ("bf16", "q4_0")}
    # one chunk per batch, so the chunks can be split over tasks in any way
    settings = core.EvalSettings(corpus=None, ctx=128, chunks=4, batch=128)
    return root, cfg, model, ctx, files, settings


def _evaluate(ctx, model: ModelConfig, files, settings, records, n_parts: int = 2) -> dict:
    ranges = [
        core.eval_range(ctx, model.name, "q4_0", files["q4_0"], records, i, n_parts, settings)
        for i in range(n_parts)
    ]
    return core.merge_eval(ctx, model.name, "q4_0", ranges, files["q4_0"])


def test_evaluation_split_over_workers_equals_one_worker(built):
    _root, _cfg, model, ctx, files, settings = built
    records = core.base_records(ctx, files["bf16"], settings)
    one = _evaluate(ctx, model, files, settings, records, n_parts=1)
    assert records.n_chunks == 4 and records.n_seq == 1 and one["n_chunks"] == 4
    assert _evaluate(ctx, model, files, settings, records, n_parts=2) == one
    assert _evaluate(ctx, model, files, settings, records, n_parts=4) == one


def test_base_records_are_computed_once_and_reused(built, caplog):
    root, cfg, model, ctx, files, settings = built
    first = core.base_records(ctx, files["bf16"], settings)
    mtime = (root / "store" / first.records.uri.split("/store/", 1)[1]).stat().st_mtime_ns
    later = core.ReleaseContext("t", "r2", cfg.store.url)  # another release of the same files
    with caplog.at_level(logging.INFO, logger="qatgguf.release"):
        again = core.base_records(later, files["bf16"], settings)
    assert again == first
    assert "reusing base records" in caplog.text
    assert (root / "store" / first.records.uri.split("/store/", 1)[1]).stat().st_mtime_ns == mtime
    # both releases' quant evaluations read that one record and agree exactly
    assert _evaluate(ctx, model, files, settings, first) == _evaluate(later, model, files, settings, again)


def test_a_failed_gate_publishes_nothing_and_says_why(built):
    root, cfg, model, ctx, files, settings = built
    records = core.base_records(ctx, files["bf16"], settings)
    result = _evaluate(ctx, model, files, settings, records)
    strict = GateConfig(max_mean_kld=0.0, max_kld_99_9=0.0, min_same_top_p=1.0, max_ppl_ratio=1.0)
    decision = core.gate(ctx, model.name, "q4_0", result, strict)
    assert not decision["passed"] and any("mean_kld" in r for r in decision["reasons"])
    assert ctx.store().get_json(ctx.key(model.name, "eval", "q4_0", "gate.json"))["passed"] is False
    published = core.publish_model(ctx, cfg, model, {"q4_0": files["q4_0"]}, {"q4_0": decision})
    assert published["published"] is False and "q4_0" in published["failed"]
    assert not (root / "hub" / "org" / "m-GGUF").exists()
    # the same numbers under the configured gate pass and publish
    ok = core.gate(ctx, model.name, "q4_0", result, cfg.gate_for(model))
    assert ok["passed"], ok["reasons"]
    published = core.publish_model(ctx, cfg, model, {"q4_0": files["q4_0"]}, {"q4_0": ok})
    assert published["published"] and (root / "hub" / "org" / "m-GGUF" / "m-Q4_0.gguf").exists()
