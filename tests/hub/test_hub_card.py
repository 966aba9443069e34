"""Model card rendering and validation: generic tables, values from data, front matter the
Hub accepts, GitHub-flavoured Markdown with the plot embedded."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from servers.fakehub import RunningHub

from qatgguf.errors import ModelCardError
from qatgguf.hub import CardData, CardFile, CardPlot, EvalTable, RunInfo, Sampling, render_card
from qatgguf.evaluate.tables import MethodResult, comparison_rows, comparison_table
from qatgguf.hub.card import check_card, hf_quant_matches

REPO = "acme/gemma-4-e2b-it-qat-GGUF"
RUN = RunInfo(
    max_context=131072, context=32768, kv_cache=((32768, 201_326_592), (131072, 805_306_368)),
    kv_formula="KV cache bytes = 2 × [...]", sampling=Sampling(1.0, 0.95, 64), thinking_switch=True,
)


def _card(**overrides: object) -> CardData:
    fields: dict[str, object] = dict(  # noqa: C408 (keyword form reads as the call)
        repo_id=REPO,
        base_model="google/gemma-4-e2b-it-qat",
        license="gemma",
        license_link="https://ai.google.dev/gemma/terms",
        language=("en", "de"),
        files=(
            CardFile("gemma-4-e2b-it-qat-UD-Q4_K_XL.gguf", 2_620_000_000, "UD-Q4_K_XL", release="r2"),
            CardFile("gemma-4-e2b-it-qat-Q4_0.gguf", 3_350_000_000, "Q4_0", release="r1",
                     note="kept: release r2 built q4_0 but it failed the gate"),
            CardFile("mmproj-BF16.gguf", 420_000_000, "BF16", kind="mmproj", release="r2"),
        ),
        tables=(
            comparison_table(comparison_rows("E2B", [
                MethodResult("UD-Q4_K_XL (aligned)", 2_620_000_000,
                             {"kld_99_9": 0.0557, "mean_kld": 0.00173, "same_top_p": 0.9816}),
                MethodResult("Q4_0 (naive)", 3_350_000_000,
                             {"kld_99_9": 1.0513, "mean_kld": 0.05109, "same_top_p": 0.8929}, passed=False),
            ])),
        ),
        tags=("gemma4", "qat"),
        primary_quant="UD-Q4_K_XL",
        bf16_size=9_310_000_000,
        run=RUN,
        plot=CardPlot("kld-per-token.png", alt="Per-token KLD", caption="caption"),
        collection_title="Gemma 4 QAT",
        collection_url="https://huggingface.co/collections/acme/gemma-4-qat-0123",
        release_id="r2",
    )
    fields.update(overrides)
    return CardData(**fields)  # type: ignore[arg-type]


def test_front_matter_parses_as_a_hub_card() -> None:
    card = ModelCard(render_card(_card()))
    assert card.data.base_model == "google/gemma-4-e2b-it-qat"
    assert card.data.license == "gemma" and card.data.license_link.startswith("https://")
    assert card.data.language == ["en", "de"]
    assert card.data.tags == ["gguf", "llama.cpp", "gemma4", "qat"]
    assert card.data["base_model_relation"] == "quantized"
    assert card.data.pipeline_tag == "image-text-to-text"


def test_card_passes_the_hubs_metadata_validation(fake_hub: RunningHub) -> None:
    ModelCard(render_card(_card())).validate()  # POST /api/validate-yaml on the test server
    bad = render_card(_card()).replace("license: gemma", "license: made-up", 1)
    with pytest.raises(ValueError, match="not a license id the Hub knows"):
        ModelCard(bad).validate()


def test_values_come_from_the_data() -> None:
    text = render_card(_card())
    lines = text.splitlines()
    assert "| UD-Q4_K_XL | 2.62 GB | 9.31 GB | 71.86% |" in lines
    assert "| UD-Q4_K_XL | 2.62 GB | 2.82 GB | 3.43 GB |" in lines  # + KV at 32K, 128K
    assert "**Maximum context:** 131072 tokens (128K)." in lines
    assert "`temperature = 1.0`, `top_p = 0.95`, `top_k = 64`" in text
    assert f"llama-cli -hf {REPO}:UD-Q4_K_XL \\" in lines
    assert "    --temp 1.0 --top-p 0.95 --top-k 64 --ctx-size 32768" in lines
    assert f'hf download {REPO} --include "*UD-Q4_K_XL*" "*mmproj-BF16*" \\' in lines
    assert f"llama-server -hf {REPO}:UD-Q4_K_XL --chat-template-kwargs '{{\"enable_thinking\":false}}'" in lines
    assert "| E2B | UD-Q4_K_XL (aligned) | 2.62 GB | 0.0557 | 0.00173 | 98.16 |" in lines
    assert "| E2B | Q4_0 (naive) (failed the gate) | 3.35 GB | 1.0513 | 0.05109 | 89.29 |" in lines
    assert any("`gemma-4-e2b-it-qat-Q4_0.gguf`" in x and "| r1 (kept: release r2" in x for x in lines)
    assert "Part of the [Gemma 4 QAT](https://huggingface.co/collections/acme/gemma-4-qat-0123) collection." in lines
    assert "\n\n\n" not in text
    no_switch = render_card(_card(run=RunInfo(**{**RUN.__dict__, "thinking_switch": False})))
    assert "enable_thinking" not in no_switch and "no thinking switch" in no_switch


def test_renders_as_github_markdown_with_the_plot() -> None:
    text = render_card(_card(tables=(*_card().tables, EvalTable("Mobile", ("", "E2B mobile"), (("Size", "2.19 GB"),)))))
    body = ModelCard(text).text  # the Hub renders the text below the front matter
    html = MarkdownIt("commonmark").enable("table").render(body)
    assert html.count("<table>") == 5  # files, sizes, memory, two evaluation tables
    assert '<img src="kld-per-token.png" alt="Per-token KLD"' in html
    assert "<th>Model</th>" in html and '<td style="text-align:right">0.0557</td>' in html


@pytest.mark.parametrize(
    ("name", "quant", "picked"),
    [
        ("m-Q4_0.gguf", "Q4_0", True),
        ("m.q4_0.gguf", "Q4_0", True),
        ("m-Q4_0-00001-of-00003.gguf", "Q4_0", True),
        ("m-Q4_0-00002-of-00003.gguf", "Q4_0", False),
        ("m-Q4_0_L.gguf", "Q4_0", False),
        ("mmproj-Q4_0.gguf", "Q4_0", False),
    ],
)
def test_hf_quant_matches_follows_llama_cpp(name: str, quant: str, picked: bool) -> None:
    assert hf_quant_matches(name, quant) is picked


def test_bad_card_data_is_refused() -> None:
    with pytest.raises(ModelCardError, match="repo_id must be 'org/name'"):
        _card(repo_id="no-org")
    with pytest.raises(ModelCardError, match="not an SPDX id, so the card needs license_link"):
        _card(license_link=None)
    with pytest.raises(ModelCardError, match="listed twice"):
        _card(files=(CardFile("m-Q4_0.gguf", 1, "Q4_0"), CardFile("m-Q4_0.gguf", 1, "Q4_0")))
    with pytest.raises(ModelCardError, match=r"model-q4\.gguf.*would not be found"):
        _card(files=(CardFile("model-q4.gguf", 1, "Q4_0"),))
    with pytest.raises(ModelCardError, match=r"vision\.gguf.*must have 'mmproj'"):
        _card(files=(CardFile("m-Q4_0.gguf", 1, "Q4_0"), CardFile("vision.gguf", 1, kind="mmproj")))
    with pytest.raises(ModelCardError, match="row 0 has 1 cells for 2 columns"):
        EvalTable("t", ("a", "b"), (("x",),))
    with pytest.raises(ModelCardError, match="breaks the Markdown table"):
        EvalTable("t", ("a",), (("x|y",),))
    with pytest.raises(ModelCardError, match="mean_kld=nan"):
        comparison_rows("E2B", [MethodResult("m", 1, {"kld_99_9": 0.1, "mean_kld": float("nan"),
                                                      "same_top_p": 0.9})])
    with pytest.raises(ModelCardError, match="context 999999 must be in"):
        RunInfo(max_context=1024, context=999999, kv_cache=(), kv_formula="")
    with pytest.raises(ModelCardError, match="lacks 'base_model'"):
        check_card("---\nlicense: mit\n---\n# x\n")
