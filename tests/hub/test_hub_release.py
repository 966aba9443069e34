"""publish_model end to end on the tiny E2B: converted, evaluated and gated through the
release steps, published to the Hub test server; a second release whose Q4_0 fails its
gate keeps the earlier Q4_0 file and says so on the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from servers.fakehub import RunningHub

from qatgguf import release as core
from qatgguf.config import EvalConfig, GateConfig, parse_release_config
from qatgguf.evaluate.tables import fixed
from qatgguf.hub import MANIFEST_PATH, EvalTable
from qatgguf.hub.facts import read_model_facts

pytestmark = pytest.mark.slow

REPO = "qatgguf-tiny/gemma-4-E2B-it-qat-GGUF"
RECIPES = ("UD-Q4_K_XL", "q4_0")


@pytest.fixture(scope="module")
def e2b(tmp_path_factory, tiny_family):
    """E2B converted (BF16, UD-Q4_K_XL, Q4_0, mmproj) and evaluated into a local store."""
    root = tmp_path_factory.mktemp("release")
    raw = {
        "version": 1,
        "family": "gemma-4-qat-tiny",
        "license": "apache-2.0",
        "recipes": list(RECIPES),
        "models": [
            {
                "name": "E2B",
                "source": str(tiny_family["E2B"]),
                "repo": REPO,
                "file_prefix": "gemma-4-E2B-it-qat",
                "base_model": "qatgguf-tiny/gemma-4-E2B-it-qat",
            }
        ],
        "store": {"url": str(root / "store")},
        "eval": {"ctx": 128, "chunks": 8, "batch": 128, "chunk_tasks": 2},
        "publish": {"target": "hub", "collection": "Gemma 4 QAT tiny", "card_context": 4096},
    }
    cfg = parse_release_config(raw)
    model = cfg.models[0]
    ctx = core.ReleaseContext(cfg.family, "r1", cfg.store.url)
    settings = EvalConfig(ctx=128, chunks=8, batch=128)
    plan = core.plan_model(ctx, model, ("bf16", *RECIPES), source=model.source, base_recipe="bf16",
                           settings=settings, n_parts=2)
    parts = [core.quantize_shard(ctx, model.name, plan.plan_refs, i) for i in range(plan.n_shards)]
    files = {r: core.assemble_gguf(ctx, model, r, plan.plan_refs[r], parts) for r in ("bf16", *RECIPES)}
    mmproj = core.mmproj_model(ctx, model, plan.mmproj)
    results = _evaluate(ctx, model.name, files, RECIPES, settings)
    # the mobile variant: UD-Q2_K_XL against the mobile checkpoint's own BF16
    mobile = model.model_copy(update={"name": "E2B-mobile", "source": str(tiny_family["E2B-mobile"])})
    mplan = core.plan_model(ctx, mobile, ("bf16", "UD-Q2_K_XL"), source=mobile.source, base_recipe="bf16",
                            settings=settings, n_parts=2)
    mparts = [core.quantize_shard(ctx, mobile.name, mplan.plan_refs, i) for i in range(mplan.n_shards)]
    mfiles = {r: core.assemble_gguf(ctx, mobile, r, mplan.plan_refs[r], mparts) for r in ("bf16", "UD-Q2_K_XL")}
    mresults = _evaluate(ctx, mobile.name, mfiles, ("UD-Q2_K_XL",), settings)
    mgate = core.gate(ctx, model=mobile.name, recipe="UD-Q2_K_XL", result=mresults["UD-Q2_K_XL"],
                      quant=mfiles["UD-Q2_K_XL"], thresholds=cfg.gate)
    variants = {"E2B-mobile": {"files": {"UD-Q2_K_XL": mfiles["UD-Q2_K_XL"]}, "gates": {"UD-Q2_K_XL": mgate}}}
    return root, cfg, model, files, mmproj, results, variants


def _evaluate(ctx, name, files, recipes, settings) -> dict:
    records = core.base_records(ctx, files["bf16"], settings)
    results = {}
    for r in recipes:
        ranges = [core.eval_range(ctx, model=name, recipe=r, quant=files[r], records=records, part=i,
                                  n_parts=2, settings=settings) for i in range(2)]
        results[r] = core.merge_eval(ctx, model=name, recipe=r, ranges=ranges, quant=files[r],
                                     records=records, n_parts=2)
    return results


def _gates(ctx, cfg, model, files, results, *, strict: set[str] = frozenset()) -> dict[str, dict]:
    never = GateConfig(max_mean_kld=0.0, max_kld_99_9=0.0, min_same_top_p=1.0, max_ppl_ratio=1.0)
    return {
        r: core.gate(ctx, model=model.name, recipe=r, result=results[r], quant=files[r],
                     thresholds=never if r in strict else cfg.gate_for(model))
        for r in RECIPES
    }


def _hub_cfg(cfg, hub: RunningHub):
    return cfg.model_copy(update={"publish": cfg.publish.model_copy(update={"endpoint": hub.url})})


def test_publish_release_card_plot_manifest_then_keep_failed_recipe(
    e2b, fake_hub: RunningHub, tmp_path: Path
) -> None:
    _root, cfg, model, files, mmproj, results, variants = e2b
    cfg = _hub_cfg(cfg, fake_hub)
    ctx = core.ReleaseContext(cfg.family, "r1", cfg.store.url)
    gates = _gates(ctx, cfg, model, files, results)
    assert all(g["passed"] for g in gates.values()), gates
    assert variants["E2B-mobile"]["gates"]["UD-Q2_K_XL"]["passed"]
    out = core.publish_model(
        ctx, cfg, model, {r: files[r] for r in RECIPES}, gates, mmproj=mmproj,
        base=files["bf16"], variants=variants, token=fake_hub.token,
    )
    assert out["published"] and out["committed"] and out["attempts"] == 1
    hub = fake_hub.hub
    assert len(hub.commits(REPO)) == 2  # the repo's first commit, then exactly one publish

    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    names = sorted(api.list_repo_files(REPO))
    quant = {r: files[r].files[0].uri.rsplit("/", 1)[-1] for r in RECIPES}
    mobile_file = variants["E2B-mobile"]["files"]["UD-Q2_K_XL"].files[0].uri.rsplit("/", 1)[-1]
    assert names == sorted([".gitattributes", "README.md", MANIFEST_PATH, "kld-per-token.png",
                            "mmproj-BF16.gguf", *quant.values(), mobile_file])
    card = hub.files(REPO)["README.md"].content.decode()
    (tmp_path / "README-E2B.md").write_text(card)  # kept for the report
    parsed = ModelCard(card)
    assert parsed.data.base_model == "qatgguf-tiny/gemma-4-E2B-it-qat"
    assert parsed.data.license == "apache-2.0"

    # Numbers on the card come from the files and configs.
    facts = read_model_facts(_local(ctx, files["UD-Q4_K_XL"].files[0], tmp_path))
    src_gen = json.loads((Path(cfg.models[0].source) / "generation_config.json").read_text())
    src_cfg = json.loads((Path(cfg.models[0].source) / "config.json").read_text())
    assert facts.context_length == src_cfg["text_config"]["max_position_embeddings"]
    assert f"**Maximum context:** {facts.context_length} tokens" in card
    assert (f"`temperature = {src_gen['temperature']}`, `top_p = {src_gen['top_p']}`, "
            f"`top_k = {src_gen['top_k']}`") in card
    flags = f"--temp {src_gen['temperature']} --top-p {src_gen['top_p']} --top-k {src_gen['top_k']}"
    assert f"llama-cli -hf {REPO}:UD-Q4_K_XL \\\n    {flags} --ctx-size 4096" in card
    assert f"llama-server -hf {REPO}:UD-Q4_K_XL \\\n    {flags} --ctx-size 4096" in card
    assert f'hf download {REPO} --include "*UD-Q4_K_XL*" "*mmproj-BF16*"' in card
    assert "--mmproj gemma-4-E2B-it-qat-GGUF/mmproj-BF16.gguf" in card
    assert "no thinking switch" in card  # the tiny template has none
    bf16 = files["bf16"].size
    ud = files["UD-Q4_K_XL"].size
    saved = f"{100 * (1 - ud / bf16):.2f}%"
    assert any(line.startswith("| UD-Q4_K_XL |") and line.endswith(f"| {saved} |")
               for line in card.splitlines())
    kv = facts.kv_cache_bytes(4096)
    assert f"KV cache alone: {kv / 1e6:.2f} MB at 4096 tokens" in card
    res = results["UD-Q4_K_XL"]
    row = next(line for line in card.splitlines() if line.startswith("| E2B | UD-Q4_K_XL (aligned) |"))
    assert (f"| {fixed(res['kld_99_9'], 4)} | {fixed(res['mean_kld'], 5)} | "
            f"{100 * res['same_top_p']:.2f} |") in row
    assert "| E2B | Q4_0 (naive) |" in card
    mres = variants["E2B-mobile"]["gates"]["UD-Q2_K_XL"]["result"]
    assert "### Mobile mixture" in card and "| 2-bit (TQ2_0) tensors | 16 |" in card  # the real mobile E2B
    assert f"| Mean KLD vs BF16 | {fixed(mres['mean_kld'], 5)} |" in card
    assert f"sha256 `{res['corpus_sha256']}`" in card
    assert f"Context: 128 tokens, {res['n_chunks']} chunks, {res['n_tokens']} scored tokens" in card
    assert "![Per-token KLD" in card and "(kld-per-token.png)" in card
    assert "Part of the [Gemma 4 QAT tiny](" in card
    png = hub.files(REPO)["kld-per-token.png"]
    assert png.lfs_sha256 is not None or png.content.startswith(b"\x89PNG")

    manifest = json.loads(hub.files(REPO)[MANIFEST_PATH].content)
    by_path = {e["path"]: e for e in manifest["files"]}
    assert by_path[quant["q4_0"]]["release"] == "r1"
    assert by_path[quant["q4_0"]]["sha256"] == files["q4_0"].sha256

    # Release r2: Q4_0 fails its gate. Its r1 file stays, the card says so, one commit.
    hub.commit_by_hand(REPO, {"NOTES.md": b"notes by a person\n", "extra/own.gguf": b"GGUF by hand"})
    ctx2 = core.ReleaseContext(cfg.family, "r2", cfg.store.url)
    gates2 = _gates(ctx2, cfg, model, files, results, strict={"q4_0"})
    before = len(hub.commits(REPO))
    out2 = core.publish_model(
        ctx2, cfg, model, {r: files[r] for r in RECIPES}, gates2, mmproj=mmproj,
        base=files["bf16"], token=fake_hub.token,
    )
    assert out2["committed"] and len(hub.commits(REPO)) == before + 1
    now = hub.files(REPO)
    assert quant["q4_0"] in now and "NOTES.md" in now and "extra/own.gguf" in now
    card2 = now["README.md"].content.decode()
    q4_line = next(line for line in card2.splitlines() if f"`{quant['q4_0']}`" in line)
    assert "| r1 (kept: release r2 built q4_0 but it failed the gate) |" in q4_line
    assert "| Q4_0 (naive) (failed the gate) |" in card2
    m2 = {e["path"]: e for e in json.loads(now[MANIFEST_PATH].content)["files"]}
    assert m2[quant["q4_0"]]["release"] == "r1" and m2[quant["UD-Q4_K_XL"]]["release"] == "r2"
    assert "NOTES.md" not in m2 and "extra/own.gguf" not in m2
    # No LFS object went up twice over both releases.
    puts = hub.lfs_puts()
    assert len(puts) == len(set(puts))

    # Collection: one, holding the repo; a re-publish does not duplicate it.
    assert [c.title for c in hub.collections.values()] == ["Gemma 4 QAT tiny"]
    assert [i["id"] for c in hub.collections.values() for i in c.items] == [REPO]


def _local(ctx, ref, tmp_path: Path) -> Path:
    return ctx.store().get_file(ref.uri, tmp_path / ref.uri.rsplit("/", 1)[-1], sha256=ref.sha256)


def test_extra_tables_render_as_given() -> None:
    t = EvalTable("T", ("a", "b"), (("1", "2"),))
    assert t.separator == "|---|---:|"
