"""The release's summary in one place: the rows, the text table the command prints, the
markdown report the flow attaches and the result both return."""

from __future__ import annotations

from qatgguf import release as core
from qatgguf.config import builtin_config_path, load_release_config


def _gate(recipe: str, mean_kld: float, passed: bool) -> dict:
    result = {"quant_size": 2_444_000, "mean_kld": mean_kld, "kld_99_9": 10 * mean_kld, "same_top_p": 0.9963,
              "ppl_quant": 312.254, "ppl_base": 312.1, "ppl_ratio": 1.0005, "kld_median": mean_kld / 2}
    return {"passed": passed, "reasons": [] if passed else ["mean_kld = 1, limit <= 0.5"], "result": result}


def _summary() -> dict:
    return {
        "12B": {"status": "published", "repo": "org/12B-GGUF", "error": None,
                "gates": {"UD-Q4_K_XL": _gate("UD-Q4_K_XL", 2.3e-5, True), "q4_0": _gate("q4_0", 1.0, False)},
                "tasks": [{"task": "plan-12B", "seconds": 1.0, "reused": True}, {"task": "gate-12B"}]},
        "31B": {"status": "failed", "error": "quantize-31B-shard-1: NonFiniteError: x", "gates": {}, "tasks": []},
    }


def test_rows_table_report_and_result_agree():
    cfg = load_release_config(builtin_config_path("tiny-family"))
    summary = _summary()
    result = core.release_result(cfg, release_id="r1", manifest_uri="file:///m.json", summary=summary)
    assert list(result) == ["release_id", "manifest", "rows", "models", "tables", "gate_failed", "failed"]
    assert result["gate_failed"] == ["12B/q4_0"]
    assert result["failed"] == ["31B: quantize-31B-shard-1: NonFiniteError: x"]
    rows = result["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [("12B", core.quant_label("UD-Q4_K_XL")),
                                                         ("12B", core.quant_label("q4_0"))]
    text = core.format_release_rows(rows).splitlines()
    assert text[0].split() == ["model", "method", "size", "MB", "mean", "KLD", "99.9%", "KLD", "top-1", "%", "PPL",
                               "gate"]
    assert text[1].split()[:7] == ["12B", "UD-Q4_K_XL", "2.444", "0.00002", "0.0002", "99.63", "312.254"]
    assert text[1].endswith("  PASS") and text[2].endswith("FAIL: mean_kld = 1, limit <= 0.5")
    tables = core.release_tables(cfg, summary)
    assert [t["title"] for t in result["tables"]] == [t.title for t in tables]
    report = core.release_report(family=cfg.family, release_id="r1", summary=summary,
                                 manifest_uri="file:///m.json", tables=tables).splitlines()
    assert report[:3] == [f"# Release r1 of {cfg.family}", "", "Manifest: `file:///m.json`"]
    assert "## 12B: published to `org/12B-GGUF`" in report
    assert "## 31B: **failed**: quantize-31B-shard-1: NonFiniteError: x" in report
    assert "- tasks: 2, of which 1 reused finished outputs" in report
    assert f"- {core.quant_label('q4_0')}: FAIL — mean_kld = 1, limit <= 0.5" in report
