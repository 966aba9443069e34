"""Release step: publish one model's files, card, plot and repo manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qatgguf.config import ModelConfig, ReleaseConfig
from qatgguf.keys import (
    cas_key,
)
from qatgguf.release.context import ReleaseContext, fetch_object, quant_label, scratch
from qatgguf.release.refs import GGUFOutput
from qatgguf.resources import StepStats


def publish_model(
    ctx: ReleaseContext,
    cfg: ReleaseConfig,
    model: ModelConfig,
    files: dict[str, GGUFOutput],
    gates: dict[str, dict],
    *,
    mmproj: GGUFOutput | None = None,
    base: GGUFOutput | None = None,
    variants: dict[str, dict] | None = None,
    tables: Sequence = (),
    token: str | None = None,
) -> dict:
    """Publish the files that passed the gate, with the mmproj, the model card (and its
    KLD plot) and the repo manifest, in one commit; then put the repo in the family's
    collection.

    `files` are the model's publishable files and `gates` the decisions of every recipe
    evaluated on it (the compare-only ones fill the card's naive-against-aligned table).
    `variants` maps each variant checkpoint (`E2B-mobile`) to {"files": its publishable
    files, "gates": its decisions}: they go into the same commit, and the card's mobile
    table. Never publishes a file whose gate decision is missing or failed; a recipe that
    failed keeps the file an earlier release published there. If none passed, nothing is
    published (no repo is created) and the result says why. `base` is the BF16 file (for
    the size table); `tables` extra `EvalTable`s for the card. The KLD plot reads the
    per-token values of the ranges each merged evaluation lists. Raises PublishError or
    ModelCardError."""
    from qatgguf.hub import (
        CardData,
        CardPlot,
        ReleaseFile,
        ReleaseUpload,
        RetryPolicy,
        content,
        open_publisher,
        read_model_facts,
        render_card,
    )

    variants = variants or {}
    candidates = [(r, files[r], gates.get(r, {})) for r in files]
    candidates += [(r, v["files"][r], v["gates"].get(r, {})) for v in variants.values() for r in v["files"]]
    passed = [(r, f) for r, f, g in candidates if g.get("passed")]
    failed = {r: g.get("reasons", ["no gate decision"]) for r, _, g in candidates if not g.get("passed")}
    store = ctx.store()
    data = {"model": model.name, "repo": model.repo, "published": False, "files": [], "failed": failed}
    if not passed:
        store.put_json(data, ctx.key(model.name, "published.json"))
        return data
    pub = cfg.publish
    naive = cfg.naive_recipe
    aligned = next((r for r in files if r != naive), None)
    labels = {r: quant_label(r) for r in {*gates, *(r for r, _, _ in candidates)}}
    primary = aligned if any(r == aligned for r, _ in passed) else passed[0][0]
    with scratch(f"{model.name}-publish-") as work:
        upload_files: list[ReleaseFile] = []
        stats = StepStats()
        for recipe, out in passed:
            for ref in out.files:
                upload_files.append(ReleaseFile(fetch_object(store, ref, work, stats), recipe, "model", labels[recipe]))
        for ref in (mmproj.files if mmproj else ()):
            p = fetch_object(store, ref, work, stats)
            upload_files.append(ReleaseFile(p, "mmproj", "mmproj", p.stem.split("-", 1)[-1]))
        primary_file = next(f for f in upload_files if f.recipe == primary)
        run = content.run_info(read_model_facts(primary_file.path), context=pub.card_context)
        card_tables = [content.comparison_table(model.name, gates, labels, aligned=aligned, naive=naive)]
        mobile = variant_table(model, variants, {f.path.name: f.path for f in upload_files})
        card_tables += [mobile] if mobile else []
        card_tables += list(tables)
        assets: list[tuple[str, bytes]] = []
        plot = None
        if aligned in gates and naive in gates:
            png = _kld_plot(store, model.name, work, (aligned, naive), labels, gates)
            assets.append((content.PLOT_PATH, png))
            plot = CardPlot(
                content.PLOT_PATH,
                alt=f"Per-token KLD of {labels[aligned]} and {labels[naive]} against BF16",
                caption=(
                    f"Distribution of the per-token KL divergence against BF16 of the aligned "
                    f"{labels[aligned]} and the naive {labels[naive]}, over the same scored tokens."
                ),
            )
        result = gates[primary]["result"]
        method = content.eval_method(
            result,
            corpus=Path(cfg.eval.corpus).name if cfg.eval.corpus else "default.txt",
            llama_cpp_commit=_llama_cpp_commit(),
            base_file=f"{model.file_prefix}-{quant_label(cfg.base_recipe)}.gguf",
            quant_file=primary_file.path.name,
            batch=cfg.eval.batch,
        )
        bf16_size = (base.size if base else 0) or result.get("base_size")
        publisher = open_publisher(
            pub, token=token, retry=RetryPolicy(max_attempts=pub.max_attempts, max_seconds=pub.max_seconds)
        )
        collection = None
        if pub.collection:
            collection = publisher.ensure_collection(pub.collection, namespace=model.repo.split("/", 1)[0])

        def card(manifest) -> str:
            return render_card(
                CardData(
                    repo_id=model.repo,
                    base_model=model.base_model or f"{cfg.family}/{model.name}",
                    license=cfg.license,
                    license_link=content.license_link(cfg.license, pub.license_link),
                    language=pub.languages,
                    quantized_by=cfg.quantized_by,
                    files=content.card_files(manifest, release_id=ctx.release_id, failed=failed),
                    tables=tuple(card_tables),
                    tags=("gemma4", "qat", "quantization-aware-training"),
                    primary_quant=labels[primary],
                    bf16_size=int(bf16_size) if bf16_size else None,
                    run=run,
                    method=method,
                    plot=plot,
                    collection_title=collection.title if collection else None,
                    collection_url=collection.url if collection else None,
                    release_id=ctx.release_id,
                )
            )

        upload = ReleaseUpload(ctx.release_id, tuple(upload_files), card, tuple(assets))
        result_pub = publisher.publish(
            model.repo, upload,
            commit_message=f"Release {ctx.release_id}: {', '.join(labels[r] for r, _ in passed)}",
        )
        if collection is not None:
            collection = publisher.add_to_collection(collection, model.repo)
    data.update(
        published=True, url=result_pub.url, commit=result_pub.commit, files=list(result_pub.files),
        committed=result_pub.committed, kept=list(result_pub.kept), deleted=list(result_pub.deleted),
        attempts=result_pub.attempts, retries=list(result_pub.retries),
        collection=collection.url if collection else None,
    )
    store.put_json(data, ctx.key(model.name, "published.json"))
    return data


def variant_table(model: ModelConfig, variants: dict[str, dict], local: dict[str, Path]):
    """The card's mobile table: per variant, its first publishable file that passed (size,
    TQ2_0 tensors) and that file's evaluation against the variant's own BF16; None when no
    variant file is published."""
    from qatgguf.evaluate.tables import MobileResult, mobile_table, tensor_types

    columns = {}
    for name, v in variants.items():
        ok = [(r, f) for r, f in v["files"].items() if v["gates"].get(r, {}).get("passed")]
        if not ok:
            continue
        recipe, out = ok[0]
        tq2 = out.types.get("TQ2_0")
        if tq2 is None:  # an output stored before its types were recorded: read the files
            tq2 = tensor_types([local[ref.uri.rsplit("/", 1)[-1]] for ref in out.files])["TQ2_0"]
        columns[name.replace(f"{model.name}-", f"{model.name} ", 1)] = MobileResult(
            out.size, tq2, v["gates"][recipe]["result"])
    if not columns:
        return None
    return mobile_table(columns, note="The mobile mixture checkpoints, evaluated against their own BF16: 2-bit "
                                      "(TQ2_0) layers where the export put them on the ternary grid.")


def _llama_cpp_commit() -> str:
    from qatgguf.llamacpp import ggml_commit

    return ggml_commit()


def _kld_plot(store, model: str, work: Path, recipes: tuple[str, str], labels: dict[str, str],
              gates: dict[str, dict]) -> bytes:
    """The per-token KLD plot of (aligned, naive) from the range results their merged
    evaluations list (by content key)."""
    import numpy as np

    from qatgguf.evaluate import RangeValues
    from qatgguf.hub.plot import plot_kld_distribution

    values = []
    for recipe in recipes:
        keys = gates[recipe]["result"].get("ranges") or []
        refs = [store.stat(cas_key("eval", k, "range.npz")) for k in keys]
        stats = [
            RangeValues.load(store.get_file(r.uri, work / f"{recipe}-range-{i}.npz", sha256=r.sha256))
            for i, r in enumerate(refs)
            if r is not None
        ]
        if not stats:
            from qatgguf.errors import PublishError

            raise PublishError(
                f"{model}/{recipe}: no per-token evaluation in the store for ranges {keys}; "
                "evaluate it before publishing"
            )
        stats.sort(key=lambda c: c.chunk_start)
        values.append(np.concatenate([c.values.kld for c in stats]))
    out = plot_kld_distribution(
        values[0], values[1], work / "kld-per-token.png",
        aligned_label=labels[recipes[0]], naive_label=labels[recipes[1]],
        title=f"{model}: per-token KLD against BF16",
    )
    return out.read_bytes()
