"""The release flow end to end: a dense and the MoE tiny size, real Prefect, real Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qatgguf.config import builtin_config_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(tmp_path: Path, **overrides) -> Path:
    raw = yaml.safe_load(builtin_config_path("tiny-family").read_text())
    raw["store"] = {"url": str(tmp_path / "store")}
    raw["publish"] = {"target": "local", "local_root": str(tmp_path / "hub")}
    raw["eval"].update({"chunks": 8, "chunk_tasks": 2})
    raw.update(overrides)
    p = tmp_path / "release.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _task_runs(flow_run_id) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200
            )

    return asyncio.run(go())


def test_release_dense_and_moe(tmp_path, tiny_family, prefect_server, local_ray):
    from qatgguf.flows.release import release

    cfg_path = _config(tmp_path)
    state = release(config=str(cfg_path), models=["31B", "26B-A4B"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["gate_failed"] == []

    hub = tmp_path / "hub"
    for name, prefix in (("31B", "gemma-4-31B-it-qat"), ("26B-A4B", "gemma-4-26B-A4B-it-qat")):
        repo = hub / "qatgguf-tiny" / f"gemma-4-{name}-it-qat-GGUF"
        files = sorted(p.name for p in repo.iterdir())
        # the aligned file is published; naive Q4_0 and Q8_0 are evaluated for the comparison only
        assert f"{prefix}-UD-Q4_K_XL.gguf" in files
        assert f"{prefix}-Q4_0.gguf" not in files and f"{prefix}-Q8_0.gguf" not in files
        assert "mmproj-BF16.gguf" in files  # both sizes have a vision tower
        card = (repo / "README.md").read_text()
        assert card.startswith("---") and "Q4_0 (naive)" in card and "UD-Q4_K_XL (aligned)" in card

    # every artifact is in the store, with the gate decision beside the numbers
    manifest = json.loads(Path(result["manifest"].removeprefix("file://")).read_text())
    assert set(manifest["models"]) == {"31B", "26B-A4B"}

    # the Prefect API holds the flow run and at least one Completed task run per shard per model
    runs = _task_runs(state.state_details.flow_run_id)
    shard_runs = [r for r in runs if r.name.startswith("quantize-")]
    for name in ("31B", "26B-A4B"):
        index = json.loads((tiny_family[name] / "model.safetensors.index.json").read_text())
        n_shards = len(set(index["weight_map"].values()))
        mine = [r for r in shard_runs if r.name.startswith(f"quantize-{name}-shard-")]
        # one task per safetensors shard (plus one for tensors the converter generates)
        assert n_shards >= 3
        assert {f"quantize-{name}-shard-{i}" for i in range(n_shards)} <= {r.name for r in mine}
        assert all(r.state.is_completed() for r in mine)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs if not r.state.is_completed()]


def test_release_a_model_with_its_mobile_variant(tmp_path, tiny_family, prefect_server, local_ray):
    """E2B and its mobile mixture in one repo: the variant's UD-Q2_K_XL (grid: auto, types
    decided in the shard tasks) assembles under the Hub's per-file limit and goes out in
    the model's commit, with the mobile table on the card."""
    from qatgguf.flows.release import release

    state = release(config=str(_config(tmp_path)), models=["E2B"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert {m: s["status"] for m, s in result["models"].items()} == {"E2B": "published", "E2B-mobile": "published"}
    repo = tmp_path / "hub" / "qatgguf-tiny" / "gemma-4-E2B-it-qat-GGUF"
    files = sorted(p.name for p in repo.iterdir())
    want = {"gemma-4-E2B-it-qat-UD-Q4_K_XL.gguf", "gemma-4-E2B-it-qat-UD-Q2_K_XL.gguf", "mmproj-BF16.gguf"}
    assert want <= set(files)
    card = (repo / "README.md").read_text()
    assert "| 2-bit (TQ2_0) tensors |" in card and "E2B mobile" in card


def test_one_failing_model_does_not_stop_the_others(tmp_path, tiny_family, prefect_server, local_ray):
    """A corrupt shard in one model: the other model publishes, the manifest records both
    (failed with the task and error, published), and the flow run fails naming them."""
    import shutil

    from prefect.states import State

    from qatgguf.flows.release import release

    broken = tmp_path / "12B-broken"
    shutil.copytree(tiny_family["12B"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / sorted(set(index["weight_map"].values()))[1]
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64  # NaN/Inf bytes at the end of the last tensor
    shard.write_bytes(bytes(data))
    raw = yaml.safe_load(builtin_config_path("tiny-family").read_text())
    for m in raw["models"]:
        if m["name"] == "12B":
            m["source"] = str(broken)
    cfg_path = _config(tmp_path, models=raw["models"], recipes=["q4_0"], publish_recipes=["q4_0"])
    state: State = release(config=str(cfg_path), models=["12B", "31B"], return_state=True)
    assert state.is_failed()
    assert "quantize-12B-shard-1: NonFiniteError: " in state.message and "12B" in state.message
    assert "1 of 2 model(s) failed" in state.message
    manifest_uri = state.message.split("(manifest ", 1)[1].split(")", 1)[0]
    manifest = json.loads(Path(manifest_uri.removeprefix("file://")).read_text())
    assert manifest["models"]["12B"]["status"] == "failed"
    assert manifest["models"]["12B"]["error"].startswith("quantize-12B-shard-1: NonFiniteError")
    assert manifest["models"]["31B"]["status"] == "published"
    # every task that ran has its node, seconds and declared memory beside its peak RSS
    ran = [t for t in manifest["models"]["31B"]["tasks"] if t["state"] == "completed" and "peak_rss" in t]
    assert ran and all(t["peak_rss"] > 0 and t["seconds"] >= 0 and t["host"] for t in ran)
    assert all(t["declared"]["memory"] > 0 for t in ran if t["declared"])
    assert (tmp_path / "hub" / "qatgguf-tiny" / "gemma-4-31B-it-qat-GGUF" / "gemma-4-31B-it-qat-Q4_0.gguf").exists()
    assert not (tmp_path / "hub" / "qatgguf-tiny" / "gemma-4-12B-it-qat-GGUF").exists()


def test_published_numbers_agree_with_llama_perplexity(tmp_path, tiny_family, prefect_server, local_ray,
                                                       llama_tools):
    """The release's numbers for a published file are llama-perplexity's, run here on the
    published file and the release's BF16 (same context, chunks and batch)."""
    from qatgguf.flows.release import release
    from qatgguf.evaluate import default_corpus
    from qatgguf.evaluate.reference import common_args, parse_kld_summary, run_tool
    from qatgguf.store import open_store

    state = release(config=str(_config(tmp_path)), models=["31B"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    gate = result["models"]["31B"]["gates"]["UD-Q4_K_XL"]
    store = open_store(str(tmp_path / "store"))
    files = result["models"]["31B"]["outputs"]["files"]
    local = {r: store.get_file(files[r]["files"][0]["uri"], tmp_path / f"{r}.gguf") for r in ("bf16", "UD-Q4_K_XL")}
    published = tmp_path / "hub" / "qatgguf-tiny" / "gemma-4-31B-it-qat-GGUF" / "gemma-4-31B-it-qat-UD-Q4_K_XL.gguf"
    assert published.read_bytes() == local["UD-Q4_K_XL"].read_bytes()
    raw = yaml.safe_load(Path(tmp_path / "release.yaml").read_text())["eval"]
    common = common_args(ctx=raw["ctx"], batch=2048, ubatch=512, flash_attn="auto", threads=1)
    tool = llama_tools["llama-perplexity"]
    run_tool(tool, ["-m", str(local["bf16"]), "-f", str(default_corpus()), "--chunks", str(raw["chunks"]), *common,
                    "--kl-divergence-base", str(tmp_path / "base.kld")], must_contain="Final estimate")
    t = parse_kld_summary(run_tool(tool, ["-m", str(published), *common, "--kl-divergence-base",
                                          str(tmp_path / "base.kld"), "--kl-divergence"], must_contain="Same top p:"))
    ours = gate["result"]
    assert ours["ppl_quant"] == pytest.approx(t["ppl_quant"], rel=1e-3)
    assert ours["mean_kld"] == pytest.approx(t["mean_kld"], rel=1e-2, abs=2e-6)
    assert ours["kld_99_9"] == pytest.approx(t["kld_99_9"], rel=1e-2, abs=2e-6)
    assert abs(ours["same_top_p"] - t["same_top_p"]) * 100 <= 0.05


def test_files_above_the_limit_are_published_split(tmp_path, tiny_family, prefect_server, local_ray):
    """A per-file limit below the file size: the GGUFs are written as gguf-split parts,
    published under gguf-split names, and llama.cpp loads the model from the first part
    (the release evaluated it that way)."""
    from qatgguf.flows.release import release

    cfg = _config(tmp_path, publish={"target": "local", "local_root": str(tmp_path / "hub"),
                                     "split_max_size": "2M"})
    state = release(config=str(cfg), models=["31B"], return_state=True)
    assert state.is_completed(), state.message
    repo = tmp_path / "hub" / "qatgguf-tiny" / "gemma-4-31B-it-qat-GGUF"
    parts = sorted(p.name for p in repo.glob("gemma-4-31B-it-qat-UD-Q4_K_XL-*-of-*.gguf"))
    assert len(parts) >= 2 and parts[0].endswith(f"-00001-of-{len(parts):05d}.gguf")
    assert all(p.stat().st_size <= 2_000_000 for p in repo.glob("*-of-*.gguf"))  # the limit holds per file
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(repo / parts[0]), n_ctx=64, verbose=False)
    assert llm.n_vocab() > 1000
    gate = state.result()["models"]["31B"]["gates"]["UD-Q4_K_XL"]
    assert gate["passed"] and gate["result"]["quant_size"] == sum(p.stat().st_size for p in repo.glob(
        "gemma-4-31B-it-qat-UD-Q4_K_XL-*.gguf"))
