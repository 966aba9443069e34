"""LocalHubPublisher: a folder laid out as the Hub repo, swapped in atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import qatgguf.hub.local as local_mod
from qatgguf.errors import PublishError
from qatgguf.hub import CardData, CardFile, HubLimits, LocalHubPublisher, Publisher, render_card

REPO = "acme/tiny-gemma4-GGUF"


def _card_text(files: dict[str, Path], note: str = "") -> str:
    entries = [
        CardFile(
            p.name,
            p.stat().st_size,
            None if q == "mmproj" else q,
            "mmproj" if q == "mmproj" else "model",
        )
        for q, p in files.items()
    ]
    card = CardData(
        repo_id=REPO,
        base_model="google/gemma-4-e2b-it-qat",
        license="apache-2.0",
        files=tuple(entries),
        description=note,
    )
    return render_card(card)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_layout_matches_the_hub_repo(tmp_path: Path, gguf_files: dict[str, Path]) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    assert isinstance(pub, Publisher)
    card = _card_text(gguf_files)
    res = pub.publish(REPO, list(gguf_files.values()), card, commit_message="first")
    repo = tmp_path / "hub" / "acme" / "tiny-gemma4-GGUF"
    assert sorted(p.name for p in repo.iterdir()) == sorted(
        [*(p.name for p in gguf_files.values()), "README.md"]
    )
    assert res.files == tuple(sorted(p.name for p in repo.iterdir()))
    assert res.url == repo.as_uri() and res.repo_id == REPO and len(res.commit) == 40
    for p in gguf_files.values():
        assert _sha(repo / p.name) == _sha(p)
    assert (repo / "README.md").read_text() == card
    # Nothing but the repo folder and its lock file next to it.
    assert sorted(p.name for p in repo.parent.iterdir()) == [
        ".tiny-gemma4-GGUF.lock",
        "tiny-gemma4-GGUF",
    ]


def test_republish_is_idempotent_and_drops_stale_files(
    tmp_path: Path, gguf_files: dict[str, Path]
) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    card = _card_text(gguf_files)
    first = pub.publish(REPO, list(gguf_files.values()), card, commit_message="a")
    again = pub.publish(REPO, list(gguf_files.values()), card, commit_message="b")
    assert again == first

    fewer = {k: v for k, v in gguf_files.items() if k != "Q8_0"}
    res = pub.publish(REPO, list(fewer.values()), _card_text(fewer), commit_message="c")
    repo = pub.repo_dir(REPO)
    assert "tiny-gemma4-Q8_0.gguf" not in {p.name for p in repo.iterdir()}
    assert res.commit != first.commit


def test_failed_publish_keeps_the_previous_one(
    tmp_path: Path, gguf_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    card = _card_text(gguf_files)
    pub.publish(REPO, list(gguf_files.values()), card, commit_message="good")
    repo = pub.repo_dir(REPO)
    before = {p.name: _sha(p) for p in repo.iterdir()}

    copy = local_mod._copy_hashing
    calls: list[Path] = []

    def fail_on_second(src: Path, dest: Path) -> str:
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return copy(src, dest)

    monkeypatch.setattr(local_mod, "_copy_hashing", fail_on_second)
    fewer = {k: v for k, v in gguf_files.items() if k != "Q8_0"}
    with pytest.raises(
        PublishError, match=r"tiny-gemma4-GGUF: publishing .* No space left.*unchanged"
    ):
        pub.publish(REPO, list(fewer.values()), _card_text(fewer), commit_message="bad")
    assert {p.name: _sha(p) for p in repo.iterdir()} == before
    assert not list(repo.parent.glob(".tiny-gemma4-GGUF.stage-*"))


def test_limits_are_checked_before_writing(tmp_path: Path, gguf_files: dict[str, Path]) -> None:
    small = LocalHubPublisher(
        tmp_path / "hub", limits=HubLimits(max_file_size=1000, hard_file_size=10**6)
    )
    with pytest.raises(
        PublishError,
        match=r"Q4_0\.gguf: \d+ bytes is over the 1000-byte split size.*split_max_size=1000",
    ):
        small.publish(REPO, [gguf_files["Q4_0"]], "x", commit_message="m")
    huge = LocalHubPublisher(
        tmp_path / "hub", limits=HubLimits(max_file_size=10, hard_file_size=100)
    )
    with pytest.raises(PublishError, match="over the Hub's hard limit"):
        huge.publish(REPO, [gguf_files["Q4_0"]], "x", commit_message="m")
    few = LocalHubPublisher(tmp_path / "hub", limits=HubLimits(max_files_per_commit=3))
    with pytest.raises(PublishError, match="4 files in one commit; the Hub needs fewer than 3"):
        few.publish(REPO, list(gguf_files.values()), "x", commit_message="m")
    with pytest.raises(PublishError, match="two files named"):
        LocalHubPublisher(tmp_path / "hub").publish(
            REPO, [gguf_files["Q4_0"], gguf_files["Q4_0"]], "x", commit_message="m"
        )
    with pytest.raises(PublishError, match="repo id 'bad' is not valid"):
        LocalHubPublisher(tmp_path / "hub").publish(
            "bad", [gguf_files["Q4_0"]], "x", commit_message="m"
        )
    with pytest.raises(PublishError, match="not a regular file"):
        LocalHubPublisher(tmp_path / "hub").publish(
            REPO, [tmp_path / "missing.gguf"], "x", commit_message="m"
        )
    assert not (tmp_path / "hub").exists()


def test_open_publisher_from_settings(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from qatgguf.hub import HubPublisher, open_publisher

    local = open_publisher(SimpleNamespace(target="local", local_root=str(tmp_path)))
    assert isinstance(local, LocalHubPublisher) and local.root == tmp_path
    hub = open_publisher(SimpleNamespace(target="hub", endpoint="http://127.0.0.1:9"), token="hf_x")
    assert isinstance(hub, HubPublisher) and hub.endpoint == "http://127.0.0.1:9"
    with pytest.raises(PublishError, match="publish target 'ftp' is not known"):
        open_publisher(SimpleNamespace(target="ftp"))
