from __future__ import annotations

import pytest
import yaml

from qatgguf.config import builtin_config_path, load_release_config, parse_release_config
from qatgguf.errors import ConfigError


def _raw(name: str) -> dict:
    return yaml.safe_load(builtin_config_path(name).read_text())


@pytest.mark.parametrize("name", ["tiny-family", "gemma-4-qat"])
def test_builtin_configs_validate(name):
    cfg = load_release_config(builtin_config_path(name))
    assert len(cfg.models) == 5
    assert {m.name for m in cfg.models} == {"E2B", "E4B", "12B", "26B-A4B", "31B"}


def test_real_family_points_at_google_qat_sources_and_unsloth_style_repos():
    cfg = load_release_config(builtin_config_path("gemma-4-qat"))
    for m in cfg.models:
        assert m.source.startswith("hf://google/gemma-4-") and "qat" in m.source
        assert m.repo.endswith("-it-qat-GGUF")
    assert "UD-Q4_K_XL" in cfg.recipes


def test_unknown_key_is_rejected_with_its_path():
    raw = _raw("tiny-family")
    raw["gate"]["max_mean_kdl"] = 0.1  # typo
    with pytest.raises(ConfigError, match=r"gate\.max_mean_kdl"):
        parse_release_config(raw, origin="x.yaml")


def test_unknown_model_key_is_rejected():
    raw = _raw("tiny-family")
    raw["models"][0]["sorce"] = "x"
    with pytest.raises(ConfigError, match=r"models\.0\.sorce"):
        parse_release_config(raw)


def test_version_is_required():
    raw = _raw("tiny-family")
    del raw["version"]
    with pytest.raises(ConfigError, match="version"):
        parse_release_config(raw)


def test_bad_repo_and_source_are_rejected():
    raw = _raw("tiny-family")
    raw["models"][0]["repo"] = "no-slash"
    with pytest.raises(ConfigError, match="org/name"):
        parse_release_config(raw)
    raw = _raw("tiny-family")
    raw["models"][0]["source"] = "ftp://x/y"
    with pytest.raises(ConfigError, match="source"):
        parse_release_config(raw)


def test_duplicate_model_names_are_rejected():
    raw = _raw("tiny-family")
    raw["models"].append(dict(raw["models"][0]))
    with pytest.raises(ConfigError, match="unique"):
        parse_release_config(raw)


def test_select_restricts_models_and_recipes():
    cfg = load_release_config(builtin_config_path("tiny-family"))
    sub = cfg.select(models=["31B", "26B-A4B"], recipes=["q4_0"])
    assert [m.name for m in sub.models] == ["31B", "26B-A4B"]
    assert sub.recipes_for(sub.models[0]) == ("q4_0",)
    with pytest.raises(ConfigError, match="not in family"):
        cfg.select(models=["7B"])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_release_config(tmp_path / "nope.yaml")


def test_unknown_recipe_is_rejected():
    raw = _raw("tiny-family")
    raw["recipes"] = ["q4_0", "q3_XYZ"]
    with pytest.raises(ConfigError, match="q3_XYZ"):
        parse_release_config(raw)


def test_resolved_makes_local_paths_absolute(tmp_path):
    cfg = load_release_config(builtin_config_path("tiny-family")).resolved(tmp_path)
    assert cfg.store.url == str(tmp_path / "runs" / "store")
    assert cfg.publish.local_root == str(tmp_path / "runs" / "hub")
    assert all(m.source.startswith("tiny://") for m in cfg.models)
    s3 = load_release_config(builtin_config_path("gemma-4-qat")).resolved(tmp_path)
    assert s3.store.url.startswith("s3://") and s3.models[0].source.startswith("hf://")


def test_variants_publish_and_compare_recipes():
    """E2B and E4B carry their mobile mixture as a variant: its own source and recipes,
    published into the model's repo; naive Q4_0 and Q8_0 are evaluated, not published."""
    cfg = load_release_config(builtin_config_path("tiny-family"))
    e2b = cfg.model("E2B")
    main, mobile = cfg.checkpoints(e2b)
    assert main.name == "E2B" and main.variants == ()
    assert (mobile.name, mobile.source, mobile.repo, mobile.file_prefix) == (
        "E2B-mobile", "tiny://E2B-mobile", e2b.repo, e2b.file_prefix)
    assert cfg.recipes_for(main) == ("UD-Q4_K_XL", "q8_0", "q4_0") and cfg.publish_for(main) == ("UD-Q4_K_XL",)
    assert cfg.recipes_for(mobile) == ("UD-Q2_K_XL", "q4_0") and cfg.publish_for(mobile) == ("UD-Q2_K_XL",)
    assert [len(cfg.checkpoints(m)) for m in cfg.models] == [2, 2, 1, 1, 1]
    assert cfg.naive_recipe == "q4_0"
    # --recipes: those recipes on every checkpoint, each published when it passes
    sub = cfg.select(models=["E2B"], recipes=["q4_0"])
    assert [(sub.recipes_for(c), sub.publish_for(c)) for c in sub.checkpoints(sub.models[0])] == [
        (("q4_0",), ("q4_0",)), (("q4_0",), ("q4_0",))]
    raw = _raw("tiny-family")
    raw["models"][0]["variants"][0]["recipes"] = ["UD-Q9"]
    with pytest.raises(ConfigError, match="UD-Q9"):
        parse_release_config(raw)
    raw = _raw("tiny-family")
    raw["models"][0]["variants"].append(dict(raw["models"][0]["variants"][0]))
    with pytest.raises(ConfigError, match="variant names must be unique"):
        parse_release_config(raw)
    raw = _raw("tiny-family")
    raw["models"][0]["variants"][0]["source"] = "ftp://x"
    with pytest.raises(ConfigError, match="ftp://x"):
        parse_release_config(raw)


def test_split_size_reads_units():
    raw = _raw("tiny-family")
    raw["publish"]["split_max_size"] = "2G"
    assert parse_release_config(raw).publish.split_max_size == 2 * 1000**3
    assert load_release_config(builtin_config_path("gemma-4-qat")).publish.split_max_size == 50 * 1000**3
    raw["publish"]["split_max_size"] = "lots"
    with pytest.raises(ConfigError, match="split_max_size"):
        parse_release_config(raw)
