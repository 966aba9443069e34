"""hf:// and s3:// checkpoints, served by real servers on 127.0.0.1 (Hub-compatible, moto)."""

from __future__ import annotations

import pytest

from qatgguf.convert import convert, plan_conversion

pytestmark = pytest.mark.integration



def test_hf_source_fetches_only_needed_files(make_ckpt, fake_hub, tmp_path):
    from huggingface_hub import HfApi

    ckpt = make_ckpt("dense")
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    api.create_repo("tester/tiny-dense")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle that must not be fetched")
    api.upload_folder(folder_path=str(ckpt), repo_id="tester/tiny-dense")
    api.upload_file(path_or_fileobj=str(tmp_path / "pytorch_model.bin"), path_in_repo="pytorch_model.bin",
                    repo_id="tester/tiny-dense")
    opts = {"cache_dir": tmp_path / "cache", "hf_endpoint": fake_hub.url, "hf_token": fake_hub.token}
    plan = plan_conversion("hf://tester/tiny-dense@main", recipe="bf16", source_options=opts)
    fetched = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert "pytorch_model.bin" not in fetched and "config.json" in fetched
    out = convert("hf://tester/tiny-dense@main", tmp_path / "hf.gguf", recipe="bf16", source_options=opts)[0]
    # same tensors and bytes as the local conversion; general.name follows the snapshot dir
    from gguf import GGUFReader

    a = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(out).tensors}
    b = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(convert(ckpt, tmp_path / "l.gguf", recipe="bf16")[0]).tensors}
    assert a == b and len(plan.order) == len(a)


def test_hf_source_bad_repo(fake_hub, tmp_path):
    from qatgguf.errors import CheckpointError

    with pytest.raises(CheckpointError, match="hf://tester/missing"):
        plan_conversion("hf://tester/missing@main", recipe="bf16",
                        source_options={"cache_dir": tmp_path, "hf_endpoint": fake_hub.url})


def test_s3_source(make_ckpt, s3_server, s3_bucket, tmp_path):
    from qatgguf.store import open_store

    ckpt = make_ckpt("moe")
    store = open_store(f"s3://{s3_bucket}/ckpts/moe", endpoint_url=s3_server.endpoint_url,
                       credentials=s3_server.credentials)
    for f in ckpt.iterdir():
        store.put_file(f, f.name)
    opts = {"cache_dir": tmp_path / "cache", "endpoint_url": s3_server.endpoint_url,
            "credentials": s3_server.credentials}
    out = convert(f"s3://{s3_bucket}/ckpts/moe", tmp_path / "s3.gguf", recipe="bf16", source_options=opts)[0]
    ref = convert(ckpt, tmp_path / "local" / "m.gguf", recipe="bf16")[0]
    from gguf import GGUFReader

    a = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(out).tensors}
    b = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(ref).tensors}
    assert a == b
    assert s3_server.credentials.secret_access_key not in (tmp_path / "s3.gguf").read_bytes().decode("latin-1")
