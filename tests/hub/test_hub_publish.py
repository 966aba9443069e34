"""HubPublisher against the Hub-compatible test server, driven by the real huggingface_hub
client over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import traceback
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from servers.fakehub import RunningHub

from qatgguf.errors import ModelCardError, PublishError
from qatgguf.hub import CardData, CardFile, EvalRow, HubLimits, HubPublisher, Publisher, render_card

REPO = "acme/tiny-gemma4-GGUF"


def _card_text(files: dict[str, Path], *, note: str = "") -> str:
    entries = [
        CardFile(
            p.name,
            p.stat().st_size,
            None if q == "mmproj" else q,
            "mmproj" if q == "mmproj" else "model",
        )
        for q, p in files.items()
    ]
    rows = tuple(
        EvalRow(q, "qat", p.stat().st_size, 0.001, 0.01, 99.0, 10.0)
        for q, p in files.items()
        if q != "mmproj"
    )
    card = CardData(
        repo_id=REPO,
        base_model="google/gemma-4-e2b-it-qat",
        license="apache-2.0",
        files=tuple(entries),
        eval_rows=rows,
        description=note,
    )
    return render_card(card)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_publish_list_download_and_card_only_update(
    fake_hub: RunningHub, gguf_files: dict[str, Path], tmp_path: Path
) -> None:
    pub = HubPublisher(endpoint=fake_hub.url, token=fake_hub.token)
    assert isinstance(pub, Publisher)
    files = [gguf_files["Q4_0"], gguf_files["mmproj"]]
    card = _card_text({"Q4_0": gguf_files["Q4_0"], "mmproj": gguf_files["mmproj"]})
    res = pub.publish(REPO, files, card, commit_message="Add Q4_0 and mmproj")
    assert res.repo_id == REPO and res.url == f"{fake_hub.url}/{REPO}" and len(res.commit) == 40
    assert res.files == ("README.md", "mmproj-BF16.gguf", "tiny-gemma4-Q4_0.gguf")

    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", *res.files]
    info = api.model_info(REPO)
    assert info.sha == res.commit
    assert info.card_data["quantized_by"] == "qatgguf" and "gguf" in info.tags
    # GGUFs went over LFS: the Hub knows their sha256.
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
    assert lfs == {p.name: _sha(p.read_bytes()) for p in files}

    for p in files:
        got = hf_hub_download(
            REPO, p.name, endpoint=fake_hub.url, token=fake_hub.token, cache_dir=tmp_path / "cache"
        )
        assert _sha(Path(got).read_bytes()) == _sha(p.read_bytes())
    readme = hf_hub_download(REPO, "README.md", endpoint=fake_hub.url, cache_dir=tmp_path / "cache")
    assert Path(readme).read_text() == card
    puts_before = [r for r in fake_hub.hub.requests if r[0] == "PUT"]
    assert len(puts_before) == 2

    # Only the card changes: one commit, no LFS traffic at all.
    n = len(fake_hub.hub.requests)
    card2 = _card_text(
        {"Q4_0": gguf_files["Q4_0"], "mmproj": gguf_files["mmproj"]}, note="Now with notes."
    )
    res2 = pub.publish(REPO, files, card2, commit_message="Update card")
    later = fake_hub.hub.requests[n:]
    assert not [r for r in later if "/info/lfs/" in r[1] or r[1].startswith("/lfs-")]
    assert [r for r in later if r[1].endswith("/commit/main")] == [
        ("POST", f"/api/models/{REPO}/commit/main")
    ]
    assert res2.commit != res.commit
    assert (
        ModelCard(
            Path(
                hf_hub_download(
                    REPO, "README.md", endpoint=fake_hub.url, cache_dir=tmp_path / "cache2"
                )
            ).read_text()
        ).text.count("Now with notes.")
        == 1
    )
    entries = fake_hub.hub.files(REPO)
    assert entries["README.md"].content == card2.encode()
    assert entries["tiny-gemma4-Q4_0.gguf"].lfs_sha256 == _sha(gguf_files["Q4_0"].read_bytes())


def test_republish_replaces_stale_quants(fake_hub: RunningHub, gguf_files: dict[str, Path]) -> None:
    pub = HubPublisher(endpoint=fake_hub.url, token=fake_hub.token)
    pub.publish(REPO, list(gguf_files.values()), _card_text(gguf_files), commit_message="all")
    assert "tiny-gemma4-Q8_0.gguf" in fake_hub.hub.files(REPO)
    fewer = {k: v for k, v in gguf_files.items() if k != "Q8_0"}
    res = pub.publish(REPO, list(fewer.values()), _card_text(fewer), commit_message="drop Q8_0")
    assert sorted(fake_hub.hub.files(REPO)) == sorted([".gitattributes", *res.files])
    assert "tiny-gemma4-Q8_0.gguf" not in res.files


def test_unchanged_publish_makes_no_new_commit(
    fake_hub: RunningHub, gguf_files: dict[str, Path]
) -> None:
    pub = HubPublisher(endpoint=fake_hub.url, token=fake_hub.token)
    card = _card_text(gguf_files)
    first = pub.publish(REPO, list(gguf_files.values()), card, commit_message="a")
    n = len(fake_hub.hub.requests)
    again = pub.publish(REPO, list(gguf_files.values()), card, commit_message="b")
    assert again.commit == first.commit
    assert not [
        r for r in fake_hub.hub.requests[n:] if r[1].endswith("/commit/main") or r[0] == "PUT"
    ]


def test_bad_token_is_a_clear_error_without_the_token(
    fake_hub: RunningHub, gguf_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "hf_wrongWRONGwrong0123456789abcdef"
    pub = HubPublisher(endpoint=fake_hub.url, token=secret)
    with pytest.raises(
        PublishError, match=r"tiny-gemma4-GGUF: create_repo failed: HTTP 401.*rejected the token"
    ) as info:
        pub.publish(
            REPO, [gguf_files["Q4_0"]], _card_text({"Q4_0": gguf_files["Q4_0"]}), commit_message="x"
        )
    for text in (
        str(info.value),
        repr(info.value),
        "".join(traceback.format_exception(info.value)),
        repr(pub),
        caplog.text,
    ):
        assert secret not in text
    assert REPO not in fake_hub.hub.repos


def test_hub_rejecting_the_card_is_a_card_error(
    fake_hub: RunningHub, gguf_files: dict[str, Path]
) -> None:
    pub = HubPublisher(endpoint=fake_hub.url, token=fake_hub.token)
    card = _card_text({"Q4_0": gguf_files["Q4_0"]}).replace(
        "license: apache-2.0", "license:\n- a\n- b", 1
    )
    with pytest.raises(ModelCardError, match="the Hub refused README.md.*license"):
        pub.publish(REPO, [gguf_files["Q4_0"]], card, commit_message="x")
    assert not fake_hub.hub.lfs_requests()


def test_limits_fail_before_any_request(fake_hub: RunningHub, gguf_files: dict[str, Path]) -> None:
    pub = HubPublisher(
        endpoint=fake_hub.url,
        token=fake_hub.token,
        limits=HubLimits(max_file_size=1000, hard_file_size=10**6),
    )
    with pytest.raises(PublishError, match="split size"):
        pub.publish(
            REPO, [gguf_files["Q4_0"]], _card_text({"Q4_0": gguf_files["Q4_0"]}), commit_message="x"
        )
    assert fake_hub.hub.requests == []
