"""The ArtifactStore contract, run against the local store and the S3 store (moto_server)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from qatgguf.errors import StoreError
from qatgguf.store import ArtifactRef, ArtifactStore, LocalStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_store(f"file://{tmp_path / 'store'}")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(
        f"s3://{bucket}/runs/r1",
        endpoint_url=server.endpoint_url,
        credentials=server.credentials,
        multipart_threshold=5 * 1024 * 1024,
        multipart_chunksize=5 * 1024 * 1024,
    )


class SimulatedCrash(Exception):
    pass


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_put_get_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = _write(tmp_path / "model.gguf", data)
    ref = store.put_file(src, "gemma/model.Q4_0.gguf")
    assert ref == ArtifactRef(
        store.uri_for("gemma/model.Q4_0.gguf"), hashlib.sha256(data).hexdigest(), len(data)
    )
    assert ArtifactRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref

    out = store.get_file(ref.uri, tmp_path / "dl" / "copy.gguf", sha256=ref.sha256)
    assert out.read_bytes() == data
    # By key, into a directory: the key's basename.
    (tmp_path / "dir").mkdir()
    out2 = store.get_file("gemma/model.Q4_0.gguf", tmp_path / "dir")
    assert out2 == tmp_path / "dir" / "model.Q4_0.gguf" and out2.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["model.Q4_0.gguf"]

    assert store.exists("gemma/model.Q4_0.gguf")
    assert not store.exists("gemma/other.gguf")
    assert store.stat("gemma/model.Q4_0.gguf") == ref
    assert store.stat("gemma/other.gguf") is None


def test_overwrite_replaces_object(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_file(_write(tmp_path / "a", b"first"), "k/x.bin")
    ref = store.put_file(_write(tmp_path / "a", b"second version"), "k/x.bin")
    assert store.stat("k/x.bin") == ref
    assert store.get_bytes("k/x.bin") == b"second version"


def test_bytes_json_and_list(store: ArtifactStore) -> None:
    ref = store.put_json({"b": 1, "a": [1.5, "x"]}, "parts/m/manifest.json")
    assert store.get_json(ref.uri) == {"a": [1.5, "x"], "b": 1}
    # Sorted keys: equal objects give equal digests across runs.
    assert store.put_json({"a": [1.5, "x"], "b": 1}, "parts/m/manifest2.json").sha256 == ref.sha256
    store.put_bytes(b"\x00\x01", "parts/m/p0.bin")
    store.put_bytes(b"z", "parts/n/p0.bin")
    store.put_bytes(b"z", "other.bin")
    assert store.list("parts/m/") == [
        "parts/m/manifest.json",
        "parts/m/manifest2.json",
        "parts/m/p0.bin",
    ]
    assert store.list("parts/") == [
        "parts/m/manifest.json",
        "parts/m/manifest2.json",
        "parts/m/p0.bin",
        "parts/n/p0.bin",
    ]
    assert store.list("parts/m/p") == ["parts/m/p0.bin"]
    assert len(store.list()) == 5
    assert store.get_bytes("parts/m/p0.bin") == b"\x00\x01"
    assert store.stat("parts/m/p0.bin").sha256 == hashlib.sha256(b"\x00\x01").hexdigest()


def test_digest_mismatch_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    ref = store.put_file(_write(tmp_path / "f", b"payload"), "a/f.bin")
    wrong = hashlib.sha256(b"other").hexdigest()
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(StoreError, match=rf"a/f\.bin: sha256 mismatch: expected {wrong}"):
        store.get_file(ref.uri, dest, sha256=wrong)
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    with pytest.raises(StoreError, match="not 64 lowercase hex"):
        store.get_file(ref.uri, dest, sha256="abc")


def test_missing_key_names_the_object(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no/such\.gguf.*no such"):
        store.get_file("no/such.gguf", tmp_path / "x")
    with pytest.raises(StoreError, match=r"no/such\.json.*no such"):
        store.get_json("no/such.json")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/.hidden", "a\\b"])
def test_bad_keys_are_refused(store: ArtifactStore, tmp_path: Path, key: str) -> None:
    src = _write(tmp_path / "f", b"x")
    with pytest.raises(StoreError, match="artifact key"):
        store.put_file(src, key)


def test_uri_of_another_store_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    other = "s3://elsewhere/k.bin" if isinstance(store, LocalStore) else f"file://{tmp_path}/k.bin"
    with pytest.raises(StoreError, match="not .*this store|not a URI of this store"):
        store.get_bytes(other)


def test_missing_source_file(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"nope\.gguf: cannot store .* not a regular file"):
        store.put_file(tmp_path / "nope.gguf", "k.gguf")


def test_failed_upload_leaves_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    """An upload that dies part-way (here: the progress callback raises) leaves no object."""
    src = _write(tmp_path / "big.gguf", os.urandom(12 * 1024 * 1024))
    seen: list[int] = []

    def boom(n: int) -> None:
        seen.append(n)
        if sum(seen) > 4 * 1024 * 1024:
            raise SimulatedCrash("simulated crash mid-upload")

    with pytest.raises(SimulatedCrash):
        store.put_file(src, "m/big.gguf", progress=boom)
    assert not store.exists("m/big.gguf")
    assert store.list("m/") == []


def test_swapped_arguments_say_the_order(store: ArtifactStore) -> None:
    with pytest.raises(StoreError, match="must be a str, got dict; the data comes first, then the key"):
        store.put_json("k.json", {"a": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [300_000, 11 * 1024 * 1024])  # one PutObject; a multipart upload on S3
def test_exclusive_write_keeps_the_first_object(store: ArtifactStore, tmp_path: Path, size: int) -> None:
    """A content key written by two runs: the second write changes nothing and gets the
    first object's reference back (S3 If-None-Match: *, a hard link on disk)."""
    first = _write(tmp_path / "a.part", os.urandom(size))
    second = _write(tmp_path / "b.part", os.urandom(size))
    ref = store.put_file(first, "parts/k1.part", exclusive=True)
    again = store.put_file(second, "parts/k1.part", exclusive=True)
    assert again == ref
    assert store.get_file(ref.uri, tmp_path / "back.part", sha256=ref.sha256).read_bytes() == first.read_bytes()
    assert store.put_bytes(b"late", "parts/k2.json", exclusive=True).size == 4
    assert store.put_bytes(b"later", "parts/k2.json", exclusive=True).size == 4
    assert store.get_bytes("parts/k2.json") == b"late"
    # without exclusive, a write replaces as before
    assert store.put_bytes(b"replaced", "parts/k2.json").size == 8
    assert sorted(store.list("parts/")) == ["parts/k1.part", "parts/k2.json"]


def test_info_range_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    ref = store.put_file(_write(tmp_path / "s.bin", data), "src/s.bin")
    info = store.info("src/s.bin")
    assert info is not None and info.size == len(data) and info.sha256 == ref.sha256
    assert store.read_range("src/s.bin", 0, 8) == data[:8]
    assert store.read_range(ref.uri, 99_990, 100) == data[99_990:]  # short at the end
    assert store.info("src/missing.bin") is None
    store.delete("src/s.bin")
    store.delete("src/s.bin")  # absent: not an error
    assert store.info("src/s.bin") is None and not store.exists("src/s.bin")
