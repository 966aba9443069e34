"""The release's summary: rows per evaluated file, the comparison tables, the text table
the command prints, the markdown report and the result the flow returns."""

from __future__ import annotations

from qatgguf.config import ReleaseConfig
from qatgguf.release.context import quant_label


def release_rows(summary: dict[str, dict]) -> list[dict]:
    """One row per evaluated file: what the release prints and its table artifact shows."""
    rows = []
    for name, s in summary.items():
        for r, g in (s.get("gates") or {}).items():
            res = g["result"]
            rows.append({
                "model": name,
                "method": quant_label(r),
                "size_MB": round(res.get("quant_size", 0) / 1e6, 3),
                "mean_KLD": round(res["mean_kld"], 6),
                "KLD_99.9%": round(res["kld_99_9"], 6),
                "top1_%": round(100 * res["same_top_p"], 2),
                "PPL": round(res["ppl_quant"], 4),
                "gate": "PASS" if g["passed"] else "FAIL: " + "; ".join(g["reasons"]),
            })
    return rows


def release_result(cfg: ReleaseConfig, *, release_id: str, manifest_uri: str, summary: dict[str, dict],
                   tables: list | None = None) -> dict:
    """What a release returns and `qatgguf release --json` prints: its id, manifest, rows
    (`release_rows`), models, tables as markdown (`release_tables`, unless given), the
    files whose gate failed and the models that failed."""
    tables = release_tables(cfg, summary) if tables is None else tables
    return {"release_id": release_id, "manifest": manifest_uri, "rows": release_rows(summary), "models": summary,
            "tables": [{"title": t.title, "markdown": t.markdown()} for t in tables],
            "gate_failed": [f"{m}/{r}" for m, s in summary.items() for r, g in s["gates"].items() if not g["passed"]],
            "failed": [f"{m}: {s['error']}" for m, s in summary.items() if s["status"] == "failed"]}


def format_release_rows(rows: list[dict]) -> str:
    """`release_rows` as the fixed-width text table the `qatgguf release` command prints
    (a header line, then one line per file)."""
    lines = [f"{'model':<10} {'method':<12} {'size MB':>9} {'mean KLD':>10} {'99.9% KLD':>10} {'top-1 %':>8} "
             f"{'PPL':>9}  gate"]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['method']:<12} {r['size_MB']:>9.3f} {r['mean_KLD']:>10.5f} "
                     f"{r['KLD_99.9%']:>10.4f} {r['top1_%']:>8.2f} {r['PPL']:>9.3f}  {r['gate']}")
    return "\n".join(lines) + "\n"


def release_report(*, family: str, release_id: str, summary: dict[str, dict], manifest_uri: str,
                   tables: list) -> str:
    """The release's markdown report (the flow's `<family>-release` artifact): the tables
    (`release_tables`), then each model's state, its gates and how many tasks reused
    finished outputs."""
    lines = [f"# Release {release_id} of {family}", "", f"Manifest: `{manifest_uri}`", ""]
    for table in tables:
        lines += [f"## {table.title}", "", table.note, "", table.markdown()]
    for name, s in summary.items():
        if s["status"] == "failed":
            state = f"**failed**: {s['error']}"
        elif s["status"] == "published":
            state = f"published to `{s['repo']}`"
        else:
            state = "**not published**"
        lines.append(f"## {name}: {state}")
        for r, g in s["gates"].items():
            verdict = "PASS" if g["passed"] else "FAIL — " + "; ".join(g["reasons"])
            lines.append(f"- {quant_label(r)}: {verdict}")
        done = [x for x in s["tasks"] if x.get("seconds") is not None]
        reused = sum(1 for x in done if x.get("reused"))
        lines.append(f"- tasks: {len(s['tasks'])}, of which {reused} reused finished outputs")
        lines.append("")
    return "\n".join(lines)


def release_tables(cfg: ReleaseConfig, summary: dict[str, dict]) -> list:
    """The release's two comparison tables (`EvalTable`s): naive against aligned for
    every model (the aligned file, then the naive baseline), and the mobile mixtures
    (each variant's published file against its own BF16)."""
    from qatgguf.evaluate.tables import (
        MethodResult,
        MobileResult,
        comparison_rows,
        comparison_table,
        mobile_table,
    )

    naive = cfg.naive_recipe
    rows: list[dict[str, str]] = []
    columns: dict[str, MobileResult] = {}
    for m in cfg.models:
        for ck in cfg.checkpoints(m):
            s = summary.get(ck.name) or {}
            gates = s.get("gates") or {}
            publish = [r for r in cfg.publish_for(ck) if r in gates and r != naive]
            if ck.name == m.name:
                order = publish[:1] + ([naive] if naive in gates else [])
                rows += comparison_rows(m.name, [
                    MethodResult(quant_label(r), int(gates[r]["result"]["quant_size"]), gates[r]["result"],
                                 passed=bool(gates[r]["passed"])) for r in order])
            elif publish:
                r = publish[0]
                out = ((s.get("outputs") or {}).get("files") or {}).get(r) or {}
                columns[ck.name.replace("-", " ", 1)] = MobileResult(
                    int(gates[r]["result"]["quant_size"]), int((out.get("types") or {}).get("TQ2_0", 0)),
                    gates[r]["result"])
    tables = []
    if rows:
        tables.append(comparison_table(rows, note=f"Mean and 99.9% KLD and top-1 agreement against each model's "
                                                  f"BF16; {quant_label(naive) if naive else ''} is the naive "
                                                  "conversion (llama-quantize's choices)."))
    if columns:
        tables.append(mobile_table(columns))
    return tables
