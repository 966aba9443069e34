"""HubPublisher against the Hub-compatible test server, driven by the real huggingface_hub
client over HTTP on 127.0.0.1: one commit per publish against the listed head, deletion
of owned files only, privacy and token rules, and injected faults (429 with Retry-After,
503, a connection dropped mid-upload, a concurrent commit between list and commit)."""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from servers.fakehub import Fault, RunningHub

from qatgguf.errors import ModelCardError, PublishError
from qatgguf.hub import (
    MANIFEST_PATH,
    CardData,
    HubLimits,
    HubPublisher,
    Manifest,
    Publisher,
    ReleaseFile,
    ReleaseUpload,
    RetryPolicy,
    render_card,
)
from qatgguf.hub.content import card_files

REPO = "acme/tiny-gemma4-GGUF"


def _upload(files: dict[str, Path], release: str, *, note: str = "", failed=()) -> ReleaseUpload:
    rfiles = tuple(
        ReleaseFile(p, "mmproj" if q == "mmproj" else q.lower(), "mmproj" if q == "mmproj" else "model",
                    "BF16" if q == "mmproj" else q)
        for q, p in files.items()
    )

    def card(manifest: Manifest) -> str:
        return render_card(
            CardData(
                repo_id=REPO,
                base_model="google/gemma-4-e2b-it-qat",
                license="apache-2.0",
                files=card_files(manifest, release_id=release, failed={r: ["x"] for r in failed}),
                description=note,
                release_id=release,
            )
        )

    return ReleaseUpload(release, rfiles, card)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pub(hub: RunningHub, **kw) -> HubPublisher:
    recorded: list[float] = kw.pop("waits", [])
    return HubPublisher(endpoint=hub.url, token=hub.token, sleep=recorded.append, **kw)


def _commits(hub: RunningHub) -> int:
    return len(hub.hub.commits(REPO)) if REPO in hub.hub.repos else 0


def test_publish_list_download_and_card_only_update(
    fake_hub: RunningHub, gguf_files: dict[str, Path], tmp_path: Path
) -> None:
    pub = _pub(fake_hub)
    assert isinstance(pub, Publisher)
    files = {"Q4_0": gguf_files["Q4_0"], "mmproj": gguf_files["mmproj"]}
    res = pub.publish(REPO, _upload(files, "r1"), commit_message="Add Q4_0 and mmproj")
    assert res.committed and res.attempts == 1 and res.retries == ()
    assert res.files == ("README.md", "mmproj-BF16.gguf", "tiny-gemma4-Q4_0.gguf")
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", MANIFEST_PATH, *res.files])
    info = api.model_info(REPO)
    assert info.sha == res.commit and info.card_data["quantized_by"] == "qatgguf"
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
    assert lfs == {p.name: _sha(p.read_bytes()) for p in files.values()}
    for p in files.values():
        got = hf_hub_download(REPO, p.name, endpoint=fake_hub.url, token=fake_hub.token,
                              cache_dir=tmp_path / "cache")
        assert _sha(Path(got).read_bytes()) == _sha(p.read_bytes())
    manifest = json.loads(fake_hub.hub.files(REPO)[MANIFEST_PATH].content)
    assert {e["path"]: (e["sha256"], e["release"]) for e in manifest["files"]} == {
        p.name: (_sha(p.read_bytes()), "r1") for p in files.values()
    }
    assert len(fake_hub.hub.lfs_puts()) == 2

    # Only the card changes: one commit, no LFS traffic at all.
    n = len(fake_hub.hub.requests)
    res2 = pub.publish(REPO, _upload(files, "r1", note="Now with notes."), commit_message="card")
    later = fake_hub.hub.requests[n:]
    assert not [r for r in later if "/info/lfs/" in r[1] or r[1].startswith("/lfs-")]
    assert res2.written == ("README.md",) and res2.commit != res.commit
    assert "Now with notes." in fake_hub.hub.files(REPO)["README.md"].content.decode()

    # The same release again: nothing to do, no commit at all.
    n = len(fake_hub.hub.requests)
    res3 = pub.publish(REPO, _upload(files, "r1", note="Now with notes."), commit_message="again")
    assert not res3.committed and res3.commit == res2.commit
    assert not [r for r in fake_hub.hub.requests[n:] if r[1].endswith("/commit/main") or r[0] == "PUT"]


def test_only_owned_files_are_replaced_and_failed_recipes_keep_their_file(
    fake_hub: RunningHub, gguf_files: dict[str, Path], tmp_path: Path
) -> None:
    pub = _pub(fake_hub)
    pub.publish(REPO, _upload(gguf_files, "r1"), commit_message="r1")
    # Someone adds files by hand, a GGUF in a subfolder and one at the root included.
    fake_hub.hub.commit_by_hand(
        REPO, {"notes/readme.txt": b"hand", "sub/other.gguf": b"GGUF 1", "hand-Q2_K.gguf": b"GGUF 2"}
    )
    # r2: Q8_0 failed its gate (not in the release); Q4_0 is rebuilt with other bytes.
    new_q4 = tmp_path / "new" / "tiny-gemma4-Q4_0.gguf"
    new_q4.parent.mkdir()
    new_q4.write_bytes(gguf_files["Q4_0"].read_bytes() + b"\0" * 32)
    r2 = {"Q4_0": new_q4, "mmproj": gguf_files["mmproj"]}
    res = pub.publish(REPO, _upload(r2, "r2", failed=("q8_0",)), commit_message="r2")
    now = fake_hub.hub.files(REPO)
    assert {"notes/readme.txt", "sub/other.gguf", "hand-Q2_K.gguf"} <= set(now)
    assert "tiny-gemma4-Q8_0.gguf" in now and res.kept == ("tiny-gemma4-Q8_0.gguf",)
    assert now["tiny-gemma4-Q4_0.gguf"].lfs_sha256 == _sha(new_q4.read_bytes())
    card = now["README.md"].content.decode()
    line = next(x for x in card.splitlines() if "`tiny-gemma4-Q8_0.gguf`" in x)
    assert "| r1 (kept: release r2 built q8_0 but it failed the gate) |" in line

    # r3 moves Q4_0 to a split set: the old owned Q4_0 file is replaced (deleted), the
    # hand-made files stay.
    split = tmp_path / "split"
    split.mkdir()
    parts = [split / f"tiny-gemma4-Q4_0-0000{i}-of-00002.gguf" for i in (1, 2)]
    for i, p in enumerate(parts):
        p.write_bytes(b"GGUF part %d" % i)
    r3 = {"Q4_0": parts[0], "mmproj": gguf_files["mmproj"]}
    up = _upload(r3, "r3")
    up = ReleaseUpload("r3", (*up.files, ReleaseFile(parts[1], "q4_0", "model", "Q4_0")), up.card)
    res3 = pub.publish(REPO, up, commit_message="r3")
    now = fake_hub.hub.files(REPO)
    assert res3.deleted == ("tiny-gemma4-Q4_0.gguf",)
    assert "tiny-gemma4-Q4_0.gguf" not in now and all(p.name in now for p in parts)
    assert {"notes/readme.txt", "sub/other.gguf", "hand-Q2_K.gguf", "tiny-gemma4-Q8_0.gguf"} <= set(now)


def test_repo_created_only_with_a_valid_card_and_privacy_is_checked(
    fake_hub: RunningHub, gguf_files: dict[str, Path]
) -> None:
    files = {"Q4_0": gguf_files["Q4_0"]}
    bad = _upload(files, "r1")
    broken = ReleaseUpload(
        "r1", bad.files,
        lambda m: bad.card(m).replace("base_model: google/gemma-4-e2b-it-qat", "base_model: not a repo", 1),
    )
    with pytest.raises(ModelCardError, match="the Hub refused README.md.*base_model"):
        _pub(fake_hub).publish(REPO, broken, commit_message="x")
    assert REPO not in fake_hub.hub.repos and not fake_hub.hub.lfs_requests()

    res = _pub(fake_hub, private=True).publish(REPO, _upload(files, "r1"), commit_message="p")
    assert res.committed and fake_hub.hub.repos[REPO].private

    public = "acme/public-GGUF"
    HfApi(endpoint=fake_hub.url, token=fake_hub.token).create_repo(public)
    before = len(fake_hub.hub.commits(public))
    with pytest.raises(PublishError, match=r"publish.private is true but the repo is public"):
        _pub(fake_hub, private=True).publish(public, _upload(files, "r1"), commit_message="x")
    assert len(fake_hub.hub.commits(public)) == before


def test_tokens_never_travel_in_clear_or_appear_in_errors(
    fake_hub: RunningHub, gguf_files: dict[str, Path], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(PublishError, match="plain http on hub.example.org.*refusing to send"):
        HubPublisher(endpoint="http://hub.example.org", token="hf_secretSECRET123")
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment42")
    with pytest.raises(PublishError, match="refusing to send the token") as info:
        HubPublisher(endpoint="http://10.0.0.7:8080")
    assert "hf_fromTheEnvironment42" not in str(info.value)
    monkeypatch.delenv("HF_TOKEN")
    HubPublisher(endpoint="http://hub.example.org")  # no token: nothing to protect
    HubPublisher(endpoint="https://hub.example.org", token="hf_x1234")

    caplog.set_level(logging.DEBUG)
    secret = "hf_wrongWRONGwrong0123456789abcdef"
    pub = HubPublisher(endpoint=fake_hub.url, token=secret)
    with pytest.raises(PublishError, match=r"read repo failed: HTTP 401.*rejected the token") as info:
        pub.publish(REPO, _upload({"Q4_0": gguf_files["Q4_0"]}, "r1"), commit_message="x")
    for text in (str(info.value), repr(info.value), "".join(traceback.format_exception(info.value)),
                 repr(pub), caplog.text):
        assert secret not in text
    assert REPO not in fake_hub.hub.repos


def test_limits_fail_before_any_request(fake_hub: RunningHub, gguf_files: dict[str, Path]) -> None:
    pub = _pub(fake_hub, limits=HubLimits(max_file_size=1000, hard_file_size=10**6))
    with pytest.raises(PublishError, match="split size"):
        pub.publish(REPO, _upload({"Q4_0": gguf_files["Q4_0"]}, "r1"), commit_message="x")
    assert fake_hub.hub.requests == []


# -- injected faults ----------------------------------------------------------------------

FAULTS = {
    "429 with Retry-After on the commit": [
        Fault("POST", rf"/api/models/{REPO}/commit/main", status=429, headers=(("Retry-After", "3"),))
    ],
    "503 on the commit": [Fault("POST", rf"/api/models/{REPO}/commit/main", status=503)],
    "503 on listing the repo": [Fault("GET", rf"/api/models/{REPO}/tree/.*", status=503, times=2)],
    "connection dropped mid LFS upload": [Fault("PUT", r"/lfs-upload/[0-9a-f]{64}", drop=True)],
    "connection dropped sending the commit": [
        Fault("POST", rf"/api/models/{REPO}/commit/main", drop=True)
    ],
    "concurrent commit between list and commit": [
        Fault(
            "POST", rf"/api/models/{REPO}/commit/main",
            before=lambda hub: hub.commit_by_hand(REPO, {"CONCURRENT.md": b"another job\n"}),
        )
    ],
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_fault_ends_in_exactly_one_commit_without_duplicate_uploads(
    name: str, fake_hub: RunningHub, gguf_files: dict[str, Path]
) -> None:
    hub = fake_hub.hub
    pub = _pub(fake_hub)
    pub.publish(REPO, _upload({"Q8_0": gguf_files["Q8_0"]}, "r0"), commit_message="r0")
    faults = [hub.inject(f) for f in FAULTS[name]]
    waits: list[float] = []
    ours_before = [c for c in hub.commits(REPO) if c.summary != "by hand"]
    res = _pub(fake_hub, waits=waits).publish(REPO, _upload(gguf_files, "r1"), commit_message="r1")
    ours = [c for c in hub.commits(REPO) if c.summary != "by hand"]
    assert all(f.hits == f.times for f in faults), name
    assert len(ours) == len(ours_before) + 1 and ours[-1].oid == res.commit
    # The client's http_backoff retries listing and LFS requests itself (one attempt of
    # ours); the commit's faults come back to the publisher, which re-lists and retries.
    client_retried = name in ("503 on listing the repo", "connection dropped mid LFS upload")
    assert res.committed and (res.attempts == 1 if client_retried else res.attempts == 2), res
    assert bool(res.retries) is not client_retried
    puts = hub.lfs_puts()
    assert len(puts) == len(set(puts)) == 3  # each GGUF arrived once (Q8_0 in r0), none twice
    files = hub.files(REPO)
    assert all(p.name in files for p in gguf_files.values())
    if name.startswith("429"):
        assert 3.0 in waits  # Retry-After honoured
    if name.startswith("concurrent"):
        assert "CONCURRENT.md" in files and res.retries[0].startswith("HTTP 412")
        assert any(st == 412 for _, _, st in hub.responses)
    print(f"{name}: attempts={res.attempts} retries={list(res.retries)} waits={waits}")


def test_retries_are_bounded(fake_hub: RunningHub, gguf_files: dict[str, Path]) -> None:
    fake_hub.hub.inject(Fault("POST", rf"/api/models/{REPO}/commit/main", status=503, times=99))
    waits: list[float] = []
    pub = _pub(fake_hub, waits=waits, retry=RetryPolicy(max_attempts=3, base_wait=0.5))
    with pytest.raises(PublishError, match=r"gave up after 3 attempt\(s\).*HTTP 503 on commit"):
        pub.publish(REPO, _upload({"Q4_0": gguf_files["Q4_0"]}, "r1"), commit_message="x")
    assert waits == [0.5, 1.0]
    slow = _pub(fake_hub, retry=RetryPolicy(max_seconds=5))
    fake_hub.hub.inject(Fault("POST", rf"/api/models/{REPO}/commit/main", status=429,
                              headers=(("Retry-After", "3600"),)))
    fake_hub.hub.faults = fake_hub.hub.faults[-1:]
    with pytest.raises(PublishError, match=r"max_seconds=5.*HTTP 429"):
        slow.publish(REPO, _upload({"Q4_0": gguf_files["Q4_0"]}, "r1"), commit_message="x")


def test_collection_created_once_in_size_order_updated_in_place(
    fake_hub: RunningHub, tmp_path: Path
) -> None:
    from hub_gguf import write_tiny_gguf

    pub = _pub(fake_hub)
    # two repos of equal size: ordered by name, whichever published first
    sizes = {"acme/big-GGUF": 64 * 1024, "acme/small-GGUF": 4 * 1024, "acme/mid-GGUF": 16 * 1024,
             "acme/also-mid-GGUF": 16 * 1024}
    slugs = set()
    for round_ in (1, 2):
        for repo, n in sizes.items():
            d = tmp_path / f"{repo.split('/')[1]}-{round_}"
            d.mkdir()
            f = write_tiny_gguf(d / "m-Q4_0.gguf", arch="gemma4", seed=round_, n=n)
            up = _upload({"Q4_0": f}, f"r{round_}")
            up = ReleaseUpload(up.release_id, up.files,
                               lambda m, r=repo, c=up.card: c(m).replace(REPO, r))
            ref = pub.ensure_collection("Gemma 4 QAT", namespace="acme")
            pub.publish(repo, up, commit_message="x")
            ref = pub.add_to_collection(ref, repo)
            slugs.add(ref.slug)
    assert len(slugs) == 1 and len(fake_hub.hub.collections) == 1
    assert ref.items == ("acme/small-GGUF", "acme/also-mid-GGUF", "acme/mid-GGUF", "acme/big-GGUF")
    methods = {m for m, p in fake_hub.hub.requests if p.startswith("/api/collections")}
    assert "DELETE" not in methods and "PATCH" in methods  # moved in place, never re-made
