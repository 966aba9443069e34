"""The shipped evaluation corpus is the one its provenance describes."""

from __future__ import annotations

import hashlib
import re

from qatgguf.evaluate import default_corpus


def test_corpus_matches_provenance_and_mixes_kinds() -> None:
    path = default_corpus()
    data = path.read_bytes()
    prov = (path.parent / "PROVENANCE.md").read_text(encoding="utf-8")
    assert hashlib.sha256(data).hexdigest() in prov.replace("\n", "")
    assert f"{len(data):,} bytes" in prov
    assert len(data) < 2 * 1024 * 1024
    text = data.decode("utf-8")
    assert text.count("<|turn>user\n") > 100 and text.count("<|turn>model\n") > 100
    assert "def " in text and "import " in text  # code
    for script in (
        r"[\u0400-\u04ff]",
        r"[\u3040-\u30ff]",
        r"[\u4e00-\u9fff]",
        r"[\u0600-\u06ff]",
        r"[äöüß]",
    ):
        assert len(re.findall(script, text)) > 100, script
