"""LocalHubPublisher: a folder laid out as the Hub repo, with the same manifest rules as
the Hub publisher, swapped in atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import qatgguf.hub.local as local_mod
from qatgguf.errors import PublishError
from qatgguf.hub import (
    MANIFEST_PATH,
    CardData,
    HubLimits,
    LocalHubPublisher,
    Manifest,
    Publisher,
    ReleaseFile,
    ReleaseUpload,
    render_card,
)
from qatgguf.hub.content import card_files

REPO = "acme/tiny-gemma4-GGUF"


def _upload(files: dict[str, Path], release: str, failed=()) -> ReleaseUpload:
    rfiles = tuple(
        ReleaseFile(p, "mmproj" if q == "mmproj" else q.lower(), "mmproj" if q == "mmproj" else "model",
                    "BF16" if q == "mmproj" else q)
        for q, p in files.items()
    )

    def card(m: Manifest) -> str:
        return render_card(CardData(
            repo_id=REPO, base_model="google/gemma-4-e2b-it-qat", license="apache-2.0",
            files=card_files(m, release_id=release, failed={r: ["x"] for r in failed}),
            release_id=release,
        ))

    return ReleaseUpload(release, rfiles, card, (("plot.png", b"\x89PNG fake"),))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_layout_manifest_and_idempotence(tmp_path: Path, gguf_files: dict[str, Path]) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    assert isinstance(pub, Publisher)
    res = pub.publish(REPO, _upload(gguf_files, "r1"), commit_message="first")
    repo = tmp_path / "hub" / "acme" / "tiny-gemma4-GGUF"
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted([*(p.name for p in gguf_files.values()), "README.md", MANIFEST_PATH, "plot.png"])
    assert res.committed and res.url == repo.as_uri() and len(res.commit) == 40
    for p in gguf_files.values():
        assert _sha(repo / p.name) == _sha(p)
    m = json.loads((repo / MANIFEST_PATH).read_text())
    assert {e["path"] for e in m["files"]} == {*(p.name for p in gguf_files.values()), "plot.png"}
    again = pub.publish(REPO, _upload(gguf_files, "r1"), commit_message="again")
    assert not again.committed and again.commit == res.commit
    assert sorted(p.name for p in repo.parent.iterdir()) == [".tiny-gemma4-GGUF.lock", "tiny-gemma4-GGUF"]


def test_failed_recipe_keeps_its_file_and_hand_files_survive(
    tmp_path: Path, gguf_files: dict[str, Path]
) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    pub.publish(REPO, _upload(gguf_files, "r1"), commit_message="r1")
    repo = pub.repo_dir(REPO)
    (repo / "notes").mkdir()
    (repo / "notes" / "mine.gguf").write_bytes(b"by hand")
    (repo / "extra-Q2_K.gguf").write_bytes(b"by hand too")
    fewer = {k: v for k, v in gguf_files.items() if k != "Q8_0"}
    res = pub.publish(REPO, _upload(fewer, "r2", failed=("q8_0",)), commit_message="r2")
    assert res.kept == ("tiny-gemma4-Q8_0.gguf",)
    assert (repo / "tiny-gemma4-Q8_0.gguf").exists()
    assert (repo / "notes" / "mine.gguf").read_bytes() == b"by hand"
    assert (repo / "extra-Q2_K.gguf").exists()
    card = (repo / "README.md").read_text()
    assert "| r1 (kept: release r2 built q8_0 but it failed the gate) |" in card


def test_failed_publish_keeps_the_previous_one(
    tmp_path: Path, gguf_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    pub.publish(REPO, _upload(gguf_files, "r1"), commit_message="good")
    repo = pub.repo_dir(REPO)
    before = {p.name: _sha(p) for p in repo.iterdir()}

    def no_space(src: Path, dest: Path, **_kw) -> tuple[str, int]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_mod, "copy_hashing", no_space)
    new_q4 = tmp_path / "tiny-gemma4-Q4_0.gguf"
    new_q4.write_bytes(b"new bytes")
    changed = {**gguf_files, "Q4_0": new_q4}
    with pytest.raises(PublishError, match=r"tiny-gemma4-GGUF: publishing .* No space left.*unchanged"):
        pub.publish(REPO, _upload(changed, "r2"), commit_message="bad")
    assert {p.name: _sha(p) for p in repo.iterdir()} == before
    assert not list(repo.parent.glob(".tiny-gemma4-GGUF.stage-*"))


def test_limits_are_checked_before_writing(tmp_path: Path, gguf_files: dict[str, Path]) -> None:
    small = LocalHubPublisher(tmp_path / "hub", limits=HubLimits(max_file_size=1000, hard_file_size=10**6))
    with pytest.raises(PublishError, match=r"Q4_0\.gguf: \d+ bytes is over the 1000-byte split size"):
        small.publish(REPO, _upload({"Q4_0": gguf_files["Q4_0"]}, "r"), commit_message="m")
    few = LocalHubPublisher(tmp_path / "hub", limits=HubLimits(max_files_per_commit=4))
    with pytest.raises(PublishError, match="5 files in one commit; the Hub needs fewer than 4"):
        few.publish(REPO, _upload(gguf_files, "r"), commit_message="m")
    with pytest.raises(PublishError, match="repo id 'bad' is not valid"):
        LocalHubPublisher(tmp_path / "hub").publish("bad", _upload(gguf_files, "r"), commit_message="m")
    named = ReleaseUpload("r", (ReleaseFile(gguf_files["Q4_0"], "q4_0"),), lambda m: "", ((MANIFEST_PATH, b"x"),))
    with pytest.raises(PublishError, match="card asset 'qatgguf-manifest.json': the name is taken"):
        LocalHubPublisher(tmp_path / "hub").publish(REPO, named, commit_message="m")
    assert not (tmp_path / "hub").exists()


def test_local_collection_in_size_order(tmp_path: Path, gguf_files: dict[str, Path]) -> None:
    pub = LocalHubPublisher(tmp_path / "hub")
    ref = pub.ensure_collection("Gemma 4 QAT tiny", namespace="acme")
    for repo, key in (("acme/big-GGUF", "Q8_0"), ("acme/small-GGUF", "mmproj")):
        files = {"Q4_0": gguf_files["Q4_0"]} if key == "mmproj" else gguf_files
        up = _upload(files, "r1")
        pub.publish(repo, ReleaseUpload("r1", up.files, lambda m, r=repo, c=up.card: c(m).replace(REPO, r)),
                    commit_message="x")
        ref = pub.add_to_collection(ref, repo)
    assert ref.items == ("acme/small-GGUF", "acme/big-GGUF")
    assert pub.ensure_collection("Gemma 4 QAT tiny", namespace="acme").items == ref.items


def test_open_publisher_from_settings(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from qatgguf.hub import HubPublisher, open_publisher

    local = open_publisher(SimpleNamespace(target="local", local_root=str(tmp_path)))
    assert isinstance(local, LocalHubPublisher) and local.root == tmp_path
    hub = open_publisher(SimpleNamespace(target="hub", endpoint="http://127.0.0.1:9"), token="hf_x")
    assert isinstance(hub, HubPublisher) and hub.endpoint == "http://127.0.0.1:9"
    with pytest.raises(PublishError, match="publish target 'ftp' is not known"):
        open_publisher(SimpleNamespace(target="ftp"))
