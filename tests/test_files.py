"""qatgguf.files: a file appears whole or not at all; the first exclusive writer wins;
sha256_file agrees with hashlib."""

from __future__ import annotations

import hashlib

import pytest

from qatgguf.files import atomic_output, copy_hashing, sha256_file, temp_name


def test_atomic_output_replaces_only_when_the_block_completes(tmp_path):
    out = tmp_path / "sub" / "a.bin"
    with atomic_output(out) as tmp:
        assert tmp == temp_name(out) and tmp.parent == out.parent
        tmp.write_bytes(b"one")
        assert not out.exists()
    assert out.read_bytes() == b"one"
    with pytest.raises(RuntimeError, match="half"):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("half")
    assert out.read_bytes() == b"one"  # the old file stands
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.bin"]  # no temporary left


def test_exclusive_output_first_writer_wins(tmp_path):
    out = tmp_path / "k.json"
    with atomic_output(out, exclusive=True) as tmp:
        tmp.write_text("first")
    with pytest.raises(FileExistsError):
        with atomic_output(out, exclusive=True, tmp=tmp_path / ".k.json.tmp-x") as tmp:
            tmp.write_text("second")
    assert out.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000
    p = tmp_path / "d"
    p.write_bytes(data)
    assert sha256_file(p, chunk=4096) == (hashlib.sha256(data).hexdigest(), len(data))
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == (hashlib.sha256(b"").hexdigest(), 0)
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


def test_copy_hashing(tmp_path):
    data = bytes(range(256)) * 5000
    src = tmp_path / "src"
    src.write_bytes(data)
    seen = []
    assert copy_hashing(src, tmp_path / "dst", chunk=4096, progress=seen.append) == (
        hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "dst").read_bytes() == data and sum(seen) == len(data)
    with pytest.raises(FileExistsError):  # never over an existing file
        copy_hashing(src, tmp_path / "dst")
