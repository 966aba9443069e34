"""S3 store specifics against a real moto_server process: multipart, atomicity, secrets."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import traceback
from pathlib import Path

import pytest
from servers.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY, S3Server

from qatgguf.errors import StoreError
from qatgguf.store import S3Credentials, open_store
from qatgguf.store.s3 import S3Store

MiB = 1024 * 1024


def _store(server: S3Server, bucket: str, prefix: str = "pre") -> S3Store:
    store = open_store(
        f"s3://{bucket}/{prefix}",
        endpoint_url=server.endpoint_url,
        credentials=server.credentials,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )
    assert isinstance(store, S3Store)
    return store


def _count_calls(store: S3Store) -> dict[str, int]:
    calls: dict[str, int] = {}

    def hook(model, **_: object) -> None:
        calls[model.name] = calls.get(model.name, 0) + 1

    store.client.meta.events.register("before-call.s3", hook)
    return calls


def test_multipart_upload_and_download(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB)
    src = tmp_path / "m.gguf"
    src.write_bytes(data)
    store = _store(s3_server, s3_bucket)
    calls = _count_calls(store)
    progress: list[int] = []
    ref = store.put_file(src, "m/model.gguf", progress=progress.append)
    assert ref.uri == f"s3://{s3_bucket}/pre/m/model.gguf"
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    assert sum(progress) == len(data)
    assert calls.get("CreateMultipartUpload") == 1 and calls.get("UploadPart") == 3
    assert calls.get("CompleteMultipartUpload") == 1 and "PutObject" not in calls

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="pre/m/model.gguf")
    assert head["ETag"].strip('"').endswith("-3")  # an AWS multipart ETag: 3 parts
    assert head["Metadata"]["sha256"] == ref.sha256

    out = store.get_file(ref.uri, tmp_path / "back.gguf", sha256=ref.sha256)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == ref.sha256


def test_unchanged_file_is_not_uploaded_again(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(6 * MiB))
    store = _store(s3_server, s3_bucket)
    first = store.put_file(src, "f.bin")
    calls = _count_calls(store)
    assert store.put_file(src, "f.bin") == first
    assert calls == {"HeadObject": 1}


def test_failed_multipart_upload_is_aborted(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(12 * MiB))
    store = _store(s3_server, s3_bucket)
    done: list[int] = []

    def grow_the_file(n: int) -> None:
        done.append(n)
        if len(done) == 1:  # another writer touches the file mid-upload
            with open(src, "ab") as f:
                f.write(b"late bytes")

    with pytest.raises(StoreError, match=r"s3://.*/pre/f\.bin: source file grew while uploading"):
        store.put_file(src, "f.bin", progress=grow_the_file)
    assert not store.exists("f.bin")
    client = s3_server.client()
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket)
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_same_size_change_during_upload_is_caught(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"\0" * MiB)
    store = _store(s3_server, s3_bucket)
    upload = store.client.upload_fileobj

    def upload_after_rewrite(*args: object, **kwargs: object) -> object:
        # Another writer replaces the content (same size) between the two passes.
        with open(src, "r+b") as f:
            f.write(os.urandom(MiB))
        return upload(*args, **kwargs)

    store.client.upload_fileobj = upload_after_rewrite
    with pytest.raises(StoreError, match="source file changed while uploading"):
        store.put_file(src, "f.bin")
    assert not store.exists("f.bin")


def test_missing_object_and_bucket_errors(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_bucket)
    with pytest.raises(
        StoreError,
        match=rf"s3://{s3_bucket}/pre/gone\.gguf.*bucket '{s3_bucket}'.*'pre/gone\.gguf'",
    ):
        store.get_file("gone.gguf", tmp_path / "x")
    nobucket = _store(s3_server, "qatgguf-no-such-bucket")
    with pytest.raises(
        StoreError, match=r"s3://qatgguf-no-such-bucket/pre/k\.json: put_bytes failed.*NoSuchBucket"
    ):
        nobucket.put_json({"a": 1}, "k.json")


def test_secrets_never_in_errors_reprs_or_logs(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    creds = S3Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY)
    assert TEST_ACCESS_KEY not in repr(creds) and TEST_SECRET_KEY not in str(creds)
    store = _store(s3_server, "qatgguf-no-such-bucket")
    texts = [repr(store), str(store), repr(store.__dict__)]
    src = tmp_path / "f"
    src.write_bytes(b"x" * 100)
    for action in (
        lambda: store.put_file(src, "a.bin"),
        lambda: store.get_file("a.bin", tmp_path / "o"),
        lambda: store.get_bytes("a.bin"),
        lambda: store.list(),
        lambda: _store(s3_server, s3_bucket).get_file("nope", tmp_path / "o"),
    ):
        with pytest.raises(StoreError) as info:
            action()
        texts += [
            str(info.value),
            repr(info.value),
            "".join(traceback.format_exception(info.value)),
        ]
    texts.append(caplog.text)
    for text in texts:
        assert TEST_SECRET_KEY not in text
        assert TEST_ACCESS_KEY not in text


def test_store_pickles_without_its_client(s3_server: S3Server, s3_bucket: str) -> None:
    store = _store(s3_server, s3_bucket)
    store.put_bytes(b"hello", "p.txt")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.get_bytes("p.txt") == b"hello"
    assert copy.uri_for("p.txt") == store.uri_for("p.txt")


def test_part_size_below_s3_minimum_is_refused() -> None:
    with pytest.raises(StoreError, match="below S3's minimum part size"):
        open_store("s3://bucket/x", multipart_chunksize=1024)


def test_exclusive_multipart_upload_is_conditional(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """The multipart path completes with If-None-Match: *, and the server refuses the
    second completion: the object written first stays, nothing is left unfinished."""
    store = _store(s3_server, s3_bucket)
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(11 * MiB))
    calls = _count_calls(store)
    ref = store.put_file(a, "k/obj.bin", exclusive=True)
    assert calls.get("CreateMultipartUpload") == 1 and calls.get("CompleteMultipartUpload") == 1
    # a second writer that raced past the HEAD: drive the upload directly
    b = tmp_path / "b.bin"
    b.write_bytes(os.urandom(11 * MiB))
    from qatgguf.files import sha256_file

    digest, size = sha256_file(b)
    got = store._put_exclusive(b, "k/obj.bin", sha256=digest, size=size, progress=None)
    assert got == ref
    assert store.list_incomplete_uploads() == []
    assert hashlib.sha256(store.get_bytes("k/obj.bin")).hexdigest() == ref.sha256


def test_foreign_object_etag_is_checked(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Objects written by other tools carry no sha256: the ETag pins them."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="pre/x.safetensors", Body=b"abc" * 1000)
    store = _store(s3_server, s3_bucket)
    info = store.info("x.safetensors")
    assert info is not None and info.sha256 is None and info.etag == hashlib.md5(b"abc" * 1000).hexdigest()
    store.get_file("x.safetensors", tmp_path / "x", etag=info.etag)
    client.put_object(Bucket=s3_bucket, Key="pre/x.safetensors", Body=b"xyz" * 1000)
    with pytest.raises(StoreError, match="changed"):
        store.get_file("x.safetensors", tmp_path / "y", etag=info.etag)
    with pytest.raises(StoreError, match="changed"):
        store.read_range("x.safetensors", 0, 8, etag=info.etag)


def test_incomplete_uploads_are_listed_and_aborted(s3_server: S3Server, s3_bucket: str) -> None:
    store = _store(s3_server, s3_bucket)
    upload = store.client.create_multipart_upload(Bucket=s3_bucket, Key="pre/left/over.bin")["UploadId"]
    assert store.list_incomplete_uploads() == [("left/over.bin", upload)]
    store.abort_upload("left/over.bin", upload)
    assert store.list_incomplete_uploads() == []
