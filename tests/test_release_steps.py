"""The release steps without orchestration, over content keys: every output is found again
by its key (nothing is recomputed), exactly the affected keys change when a kernel or the
llama.cpp commit changes, gate failures never publish."""

from __future__ import annotations

import pytest

from qatgguf import release as core
from qatgguf.config import EvalConfig, GateConfig, ModelConfig, parse_release_config

pytestmark = pytest.mark.slow

RECIPES = ("bf16", "q4_0")


def _plan(ctx, model, settings) -> core.ModelPlan:
    return core.plan_model(ctx, model, RECIPES, source=model.source, base_recipe="bf16", settings=settings, n_parts=2)


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
    # one chunk per batch, so the chunks can be split over tasks in any way
    settings = EvalConfig(ctx=128, chunks=4, batch=128)
    plan = _plan(ctx, model, settings)
    assert not plan.parts_done and not plan.gguf_done  # an empty store
    shards = [core.quantize_shard(ctx, model.name, plan.plan_refs, i) for i in range(plan.n_shards)]
    files = {r: core.assemble_gguf(ctx, model, r, plan.plan_refs[r], shards) for r in RECIPES}
    return root, cfg, model, ctx, plan, shards, files, settings


def _evaluate(ctx, model: ModelConfig, files, settings, records, n_parts: int = 2) -> dict:
    ranges = [core.eval_range(ctx, model=model.name, recipe="q4_0", quant=files["q4_0"], records=records, part=i,
                              n_parts=n_parts, settings=settings) for i in range(n_parts)]
    return core.merge_eval(ctx, model=model.name, recipe="q4_0", ranges=ranges, quant=files["q4_0"],
                           records=records, n_parts=n_parts)


def _numbers(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("key", "ranges")}


def test_every_output_is_found_again_by_its_key(built):
    _root, _cfg, model, ctx, plan, shards, files, settings = built
    assert not any(s.stats.reused for s in shards)
    again = [core.quantize_shard(ctx, model.name, plan.plan_refs, i) for i in range(plan.n_shards)]
    assert all(s.stats.reused and s.stats.fetched == 0 for s in again)
    assert [s.parts for s in again] == [s.parts for s in shards]
    for r in RECIPES:
        out = core.assemble_gguf(ctx, model, r, plan.plan_refs[r], again)
        assert out.stats.reused and out.files == files[r].files
    # a new plan of the unchanged source finds every output without reading a header
    later = core.ReleaseContext("t", "r2", ctx.store_url)
    replan = _plan(later, model, settings)
    assert replan.stats.fetched == 0 and replan.plan_refs == plan.plan_refs
    assert set(replan.parts_done) == set(range(plan.n_shards))
    assert set(replan.gguf_done) == set(RECIPES) and replan.gguf_done["q4_0"].files == files["q4_0"].files


def test_evaluation_split_over_workers_equals_one_worker(built):
    *_, model, ctx, _plan_, _shards, files, settings = built
    records = core.base_records(ctx, files["bf16"], settings)
    one = _evaluate(ctx, model, files, settings, records, n_parts=1)
    assert records.n_chunks == 4 and records.n_seq == 1 and one["n_chunks"] == 4
    assert _numbers(_evaluate(ctx, model, files, settings, records, n_parts=2)) == _numbers(one)
    assert _numbers(_evaluate(ctx, model, files, settings, records, n_parts=4)) == _numbers(one)


def test_base_records_and_ranges_are_computed_once(built):
    root, cfg, model, ctx, _plan_, _shards, files, settings = built
    first = core.base_records(ctx, files["bf16"], settings)
    path = root / "store" / first.records.uri.split("/store/", 1)[1]
    mtime = path.stat().st_mtime_ns
    later = core.ReleaseContext("t", "r2", cfg.store.url)  # another release of the same files
    again = core.base_records(later, files["bf16"], settings)
    assert again.stats.reused and again.key == first.key and again.records == first.records
    assert path.stat().st_mtime_ns == mtime
    a = core.eval_range(later, model=model.name, recipe="q4_0", quant=files["q4_0"], records=again, part=0,
                        n_parts=2, settings=settings)
    b = core.eval_range(later, model=model.name, recipe="q4_0", quant=files["q4_0"], records=again, part=0,
                        n_parts=2, settings=settings)
    assert b.stats.reused and a.key == b.key
    # the merged evaluation is what a new plan finds: no evaluation task is needed then
    _evaluate(ctx, model, files, settings, first)
    assert set(_plan(later, model, settings).eval_done) == {"q4_0"}


def test_exactly_the_affected_keys_change(built, monkeypatch):
    """A new Q4_0 kernel version changes the Q4_0 parts' keys and nothing of BF16; a new
    llama.cpp commit changes the evaluation keys and no conversion key."""
    from qatgguf import llamacpp
    from qatgguf.quant import registry

    *_, model, ctx, plan, _shards, files, settings = built
    store = ctx.store()
    plans = {r: core.load_plan(store, p.ref) for r, p in plan.plan_refs.items()}
    parts = {r: [core.part_key(p, i) for i in range(len(p.shards))] for r, p in plans.items()}
    records = core.base_records_key(files["bf16"].eval_digest, settings)
    monkeypatch.setitem(registry.KERNEL_VERSIONS, ("Q4_0", None), 2)
    bumped = {r: [core.part_key(p, i) for i in range(len(p.shards))] for r, p in plans.items()}
    assert bumped["bf16"] == parts["bf16"]
    q4_shards = [i for i, s in enumerate(plans["q4_0"].shards) if any(t.qtype == "Q4_0" for t in s.tensors)]
    assert q4_shards and all(bumped["q4_0"][i] != parts["q4_0"][i] for i in q4_shards)
    assert all(bumped["q4_0"][i] == parts["q4_0"][i] for i in range(len(parts["q4_0"])) if i not in q4_shards)
    assert core.base_records_key(files["bf16"].eval_digest, settings) == records
    monkeypatch.undo()
    monkeypatch.setattr(llamacpp, "ggml_commit", lambda: "fffffff")
    assert core.base_records_key(files["bf16"].eval_digest, settings) != records
    assert {r: [core.part_key(p, i) for i in range(len(p.shards))] for r, p in plans.items()} == parts


def test_a_failed_gate_publishes_nothing_and_says_why(built):
    root, cfg, model, ctx, _plan_, _shards, files, settings = built
    records = core.base_records(ctx, files["bf16"], settings)
    result = _evaluate(ctx, model, files, settings, records)
    strict = GateConfig(max_mean_kld=0.0, max_kld_99_9=0.0, min_same_top_p=1.0, max_ppl_ratio=1.0)
    decision = core.gate(ctx, model=model.name, recipe="q4_0", result=result, quant=files["q4_0"], thresholds=strict)
    assert not decision["passed"] and any("mean_kld" in r for r in decision["reasons"])
    assert ctx.store().get_json(ctx.key(model.name, "gate-q4_0.json"))["passed"] is False
    assert decision["result"]["quant_size"] == files["q4_0"].size
    published = core.publish_model(ctx, cfg, model, {"q4_0": files["q4_0"]}, {"q4_0": decision})
    assert published["published"] is False and "q4_0" in published["failed"]
    assert not (root / "hub" / "org" / "m-GGUF").exists()
    # the same numbers under the configured gate pass and publish
    ok = core.gate(ctx, model=model.name, recipe="q4_0", result=result, quant=files["q4_0"],
                   thresholds=cfg.gate_for(model))
    assert ok["passed"], ok["reasons"]
    published = core.publish_model(ctx, cfg, model, {"q4_0": files["q4_0"]}, {"q4_0": ok})
    assert published["published"] and (root / "hub" / "org" / "m-GGUF" / "m-Q4_0.gguf").exists()


def test_grid_auto_recipe_assembles_under_the_file_limit(tmp_path, tiny_family):
    """UD-Q2_K_XL on the mobile E2B: the types of its grid: auto tensors are decided in the
    shard tasks, and assembly under the publish target's per-file limit (always set by a
    release) sizes the header before it reads them."""
    from qatgguf.config import HUB_FILE_LIMIT
    from qatgguf.convert import convert

    raw = {"version": 1, "family": "t", "recipes": ["UD-Q2_K_XL"],
           "models": [{"name": "E2B-mobile", "source": str(tiny_family["E2B-mobile"]), "repo": "org/m-GGUF",
                       "file_prefix": "m"}],
           "store": {"url": str(tmp_path / "store")}, "publish": {"target": "local", "local_root": str(tmp_path / "h")}}
    cfg = parse_release_config(raw)
    model = cfg.models[0]
    ctx = core.ReleaseContext("t", "r1", cfg.store.url, split_max_size=HUB_FILE_LIMIT)
    plan = core.plan_model(ctx, model, ("bf16", "UD-Q2_K_XL"), source=model.source, base_recipe="bf16",
                           settings=EvalConfig(ctx=128, chunks=4, batch=128), n_parts=2)
    shards = [core.quantize_shard(ctx, model.name, plan.plan_refs, i) for i in range(plan.n_shards)]
    out = core.assemble_gguf(ctx, model, "UD-Q2_K_XL", plan.plan_refs["UD-Q2_K_XL"], shards)
    assert out.types.get("TQ2_0", 0) > 0 and len(out.files) == 1
    # the same bytes as the one-process converter writes
    from qatgguf.release.context import fetch_gguf
    from qatgguf.resources import StepStats

    local = fetch_gguf(ctx.store(), out, tmp_path / "got", StepStats())
    ref = convert(tiny_family["E2B-mobile"], tmp_path / "ref" / local.name, recipe="UD-Q2_K_XL")[0]
    assert local.read_bytes() == ref.read_bytes()
