"""Model card rendering and validation."""

from __future__ import annotations

import math

import pytest
from huggingface_hub import ModelCard

from qatgguf.errors import ModelCardError
from qatgguf.hub import CardData, CardFile, EvalRow, render_card
from qatgguf.hub.card import check_card, hf_quant_matches

REPO = "acme/gemma-4-e2b-it-qat-GGUF"


def _card(**overrides: object) -> CardData:
    fields: dict[str, object] = dict(
        repo_id=REPO,
        base_model="google/gemma-4-e2b-it-qat",
        license="apache-2.0",
        files=(
            CardFile("gemma-4-e2b-it-qat-Q4_0.gguf", 2_620_000_000, "Q4_0"),
            CardFile("gemma-4-e2b-it-qat-BF16.gguf", 9_310_000_000, "BF16"),
            CardFile("mmproj-BF16.gguf", 420_000_000, "BF16", kind="mmproj"),
        ),
        eval_rows=(
            EvalRow("BF16", "reference", 9_310_000_000, ppl=11.2345),
            EvalRow("Q4_0", "qat-q4_0", 2_620_000_000, 0.00123456, 0.0456, 98.654, 11.3),
        ),
        tags=("gemma4", "qat", "gguf"),
        quantized_by="acme",
        eval_notes="Corpus: built-in, ctx 512.",
    )
    fields.update(overrides)
    return CardData(**fields)  # type: ignore[arg-type]


def test_front_matter_parses_as_a_hub_card() -> None:
    text = render_card(_card())
    card = ModelCard(text)
    assert card.data.base_model == "google/gemma-4-e2b-it-qat"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["gguf", "llama.cpp", "gemma4", "qat"]
    assert card.data["quantized_by"] == "acme"
    assert card.data["base_model_relation"] == "quantized"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "gguf"


def test_tables_files_and_usage() -> None:
    text = render_card(_card())
    lines = text.splitlines()
    assert "| Q4_0 | qat-q4_0 | 2.62 GB | 0.001235 | 0.0456 | 98.65% | 11.3000 |" in lines
    assert "| BF16 | reference | 9.31 GB | — | — | — | 11.2345 |" in lines
    assert any(line.startswith("| [`mmproj-BF16.gguf`]") and "mmproj" in line for line in lines)
    assert any("`gemma-4-e2b-it-qat-Q4_0.gguf`" in line and "| Q4_0 |" in line for line in lines)
    assert f"llama-cli -hf {REPO}:Q4_0" in lines
    assert f"llama-server -hf {REPO}:Q4_0 --port 8080" in lines
    assert "llama-cli -m gemma-4-e2b-it-qat-Q4_0.gguf --mmproj mmproj-BF16.gguf" in lines
    assert "\n\n\n" not in text


def test_text_only_repo_has_no_mmproj_lines() -> None:
    text = render_card(_card(files=(CardFile("m-Q8_0.gguf", 10, "Q8_0"),), eval_rows=()))
    assert "mmproj" not in text
    assert "## Evaluation" not in text


@pytest.mark.parametrize(
    ("name", "quant", "picked"),
    [
        ("m-Q4_0.gguf", "Q4_0", True),
        ("m.q4_0.gguf", "Q4_0", True),
        ("m-Q4_0-00001-of-00003.gguf", "Q4_0", True),
        ("m-Q4_0-00002-of-00003.gguf", "Q4_0", False),
        ("mQ4_0.gguf", "Q4_0", True),
        ("m-Q4_0_L.gguf", "Q4_0", False),
        ("mmproj-Q4_0.gguf", "Q4_0", False),
    ],
)
def test_hf_quant_matches_follows_llama_cpp(name: str, quant: str, picked: bool) -> None:
    assert hf_quant_matches(name, quant) is picked


def test_model_file_llama_cpp_cannot_find_is_refused() -> None:
    with pytest.raises(
        ModelCardError, match=r"model-q4\.gguf.*would not be found by `llama-cli -hf"
    ):
        _card(files=(CardFile("model-q4.gguf", 1, "Q4_0"),))


def test_mmproj_needs_its_name() -> None:
    with pytest.raises(ModelCardError, match=r"vision\.gguf.*must have 'mmproj'"):
        _card(files=(CardFile("m-Q4_0.gguf", 1, "Q4_0"), CardFile("vision.gguf", 1, kind="mmproj")))


def test_bad_card_data_is_refused() -> None:
    with pytest.raises(ModelCardError, match="repo_id must be 'org/name'"):
        _card(repo_id="no-org")
    with pytest.raises(ModelCardError, match="base_model must be"):
        _card(base_model="")
    with pytest.raises(ModelCardError, match="listed twice"):
        _card(files=(CardFile("m-Q4_0.gguf", 1, "Q4_0"), CardFile("m-Q4_0.gguf", 1, "Q4_0")))
    with pytest.raises(ModelCardError, match="no model file"):
        _card(files=(CardFile("mmproj-BF16.gguf", 1, kind="mmproj"),))
    with pytest.raises(ModelCardError, match="mean_kld=nan"):
        _card(eval_rows=(EvalRow("Q4_0", "x", 1, mean_kld=math.nan),))


def test_check_card_rejects_cards_without_required_metadata() -> None:
    with pytest.raises(ModelCardError, match="lacks 'base_model'"):
        check_card("---\nlicense: mit\n---\n# x\n")
    with pytest.raises(ModelCardError, match="not valid card metadata"):
        check_card("---\n- a\n- b\n---\n# x\n")


def test_failed_rows_are_marked() -> None:
    rows = (EvalRow("Q2", "tq2_0", 10, 0.5, 3.0, 70.0, 20.0, passed=False),)
    assert "| Q2 | tq2_0 (failed the gate, not published) | 10 B |" in render_card(
        _card(eval_rows=rows)
    )
