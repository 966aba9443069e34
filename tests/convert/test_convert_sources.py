"""hf:// and s3:// checkpoints, served by real servers on 127.0.0.1 (Hub-compatible, moto):
planning reads headers only, tasks fetch exactly their files, digests pin the bytes."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from qatgguf.convert import convert, plan_conversion
from qatgguf.convert.source import SourceOptions, open_reader, snapshot
from qatgguf.errors import CheckpointError

pytestmark = pytest.mark.integration


def _tensors(path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(path).tensors}


def _upload(api, repo, folder, tmp_path):
    api.create_repo(repo)
    api.upload_folder(folder_path=str(folder), repo_id=repo)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle that must not be fetched")
    api.upload_file(path_or_fileobj=str(tmp_path / "pytorch_model.bin"), path_in_repo="pytorch_model.bin",
                    repo_id=repo)


def test_hf_plan_reads_headers_only(make_ckpt, fake_hub, tmp_path, monkeypatch):
    import struct

    from huggingface_hub import HfApi

    from qatgguf.convert import source

    # a probe smaller than these headers: the plan must then read exactly 8 + N bytes
    monkeypatch.setattr(source, "HEADER_PROBE", 256)

    ckpt = make_ckpt("dense")
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    _upload(api, "tester/tiny-dense", ckpt, tmp_path)
    opts = {"hf_endpoint": fake_hub.url, "hf_token": fake_hub.token}
    fake_hub.hub.bytes_served.clear()
    plan = plan_conversion("hf://tester/tiny-dense@main", recipe="bf16", source_options=opts)
    served = dict(fake_hub.hub.bytes_served)
    # the revision is pinned to the commit, even though the config said @main
    assert plan.source.revision == api.repo_info("tester/tiny-dense").sha
    assert plan.source.uri == "hf://tester/tiny-dense" and plan.source.name == "tiny-dense"
    shards = [s for s in plan.shards if s.file]
    for s in shards:
        f = plan.source.file(s.file)
        assert s.digest == f.digest and f.digest.startswith("sha256:") and f.size == s.size
        # exactly the length prefix and the JSON header, never the tensor data
        (n,) = struct.unpack("<Q", (ckpt / s.file).read_bytes()[:8])
        assert served[("tester/tiny-dense", s.file)] == max(8 + n, 256) < f.size
    assert ("tester/tiny-dense", "pytorch_model.bin") not in served
    assert served[("tester/tiny-dense", "config.json")] == plan.source.file("config.json").size
    # a shard task fetches exactly its shard, and the conversion equals the local one
    out = convert("hf://tester/tiny-dense@main", tmp_path / "hf.gguf", recipe="bf16", source_options=opts)[0]
    assert _tensors(out) == _tensors(convert(ckpt, tmp_path / "l.gguf", recipe="bf16")[0])


def test_hf_revision_pins_the_bytes(make_ckpt, fake_hub, tmp_path):
    """A new upstream commit after planning: the plan's tasks still read the planned
    revision; a file whose digest is not the plan's is refused, not converted."""
    from huggingface_hub import HfApi

    ckpt = make_ckpt("dense")
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    _upload(api, "tester/pinned", ckpt, tmp_path)
    opts = SourceOptions(hf_endpoint=fake_hub.url, hf_token=fake_hub.token)
    ref = snapshot("hf://tester/pinned", options=opts)
    (tmp_path / "config.json").write_text(json.dumps({"changed": True}))
    api.upload_file(path_or_fileobj=str(tmp_path / "config.json"), path_in_repo="config.json", repo_id="tester/pinned")
    assert snapshot("hf://tester/pinned", options=opts).revision != ref.revision
    reader = open_reader(ref, opts)
    got = reader.fetch("config.json", tmp_path / "dl")
    assert got.read_bytes() == (ckpt / "config.json").read_bytes()  # the planned revision's bytes
    # a snapshot that records another digest for the same file is refused
    bad = type(ref)(ref.uri, ref.revision, ref.name, tuple(
        type(f)(f.name, f.size, "git-sha1:" + "0" * 40) if f.name == "config.json" else f for f in ref.files))
    with pytest.raises(CheckpointError, match=r"tester/pinned/config.json: git-sha1 .* differs from the plan"):
        open_reader(bad, opts).fetch("config.json", tmp_path / "dl2")
    assert not (tmp_path / "dl2" / "config.json").exists()


def test_hf_source_bad_repo(fake_hub, tmp_path):
    with pytest.raises(CheckpointError, match="hf://tester/missing"):
        plan_conversion("hf://tester/missing@main", recipe="bf16", source_options={"hf_endpoint": fake_hub.url})


def test_s3_source(make_ckpt, s3_server, s3_bucket, tmp_path):
    from qatgguf.store import open_store

    ckpt = make_ckpt("moe")
    store = open_store(f"s3://{s3_bucket}/ckpts/moe", endpoint_url=s3_server.endpoint_url,
                       credentials=s3_server.credentials)
    for f in ckpt.iterdir():
        store.put_file(f, f.name)
    opts = {"endpoint_url": s3_server.endpoint_url, "credentials": s3_server.credentials}
    plan = plan_conversion(f"s3://{s3_bucket}/ckpts/moe", recipe="bf16", source_options=opts)
    assert plan.source.name == "moe" and plan.source.revision.startswith("s3:")
    assert all(s.digest.startswith("sha256:") for s in plan.shards if s.file)
    out = convert(f"s3://{s3_bucket}/ckpts/moe", tmp_path / "s3.gguf", recipe="bf16", source_options=opts)[0]
    ref = convert(ckpt, tmp_path / "local" / "m.gguf", recipe="bf16")[0]
    assert _tensors(out) == _tensors(ref)
    assert s3_server.credentials.secret_access_key not in (tmp_path / "s3.gguf").read_bytes().decode("latin-1")


def test_s3_foreign_objects_are_pinned_by_etag(make_ckpt, s3_server, s3_bucket, tmp_path):
    """Objects another tool wrote carry no sha256: the plan records their ETags, and a
    shard replaced after planning is refused."""
    ckpt = make_ckpt("dense")
    client = s3_server.client()
    for f in ckpt.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"foreign/dense/{f.name}", Body=f.read_bytes())
    opts = SourceOptions(s3_endpoint=s3_server.endpoint_url, s3_credentials=s3_server.credentials)
    plan = plan_conversion(f"s3://{s3_bucket}/foreign/dense", recipe="bf16", source_options=opts)
    shard = next(s for s in plan.shards if s.file)
    assert shard.digest.startswith("etag:")
    client.put_object(Bucket=s3_bucket, Key=f"foreign/dense/{shard.file}", Body=b"\0" * 16)
    with pytest.raises(CheckpointError, match=rf"foreign/dense/{shard.file}.*changed"):
        open_reader(plan.source, opts).fetch(shard.file, tmp_path / "dl")
