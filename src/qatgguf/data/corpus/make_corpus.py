"""Rebuild the default evaluation corpus (`default.txt`) from its recorded sources.

Run by hand when the corpus should change; the output is committed and its sha256 is
recorded in PROVENANCE.md. Inputs (all offline, see PROVENANCE.md for licenses):

* the CPython 3.11 standard library of the running interpreter (`pydoc_data.topics`
  for reference prose, a fixed list of modules for code),
* the Sphinx 8.2.3 wheel from PyPI (`sphinx/locale/*/LC_MESSAGES/sphinx.po`, human
  translations of Sphinx's messages) for text in other languages and chat turns.

    python make_corpus.py --sphinx-wheel sphinx-8.2.3-py3-none-any.whl --out default.txt
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import sys
import zipfile
from pathlib import Path

from qatgguf.files import atomic_output

# Reference chapters of the Python Language Reference, in this order (pydoc_data.topics keys).
PROSE_TOPICS: tuple[str, ...] = (
    "execmodel",
    "import",
    "naming",
    "compound",
    "assignment",
    "comparisons",
    "calls",
    "try",
    "with",
    "function",
    "class",
    "exceptions",
    "customization",
    "attribute-access",
    "typesmapping",
    "typesseq",
    "strings",
    "identifiers",
    "objects",
    "async",
    "raise",
    "context-managers",
    "global",
    "booleans",
    "truth",
    "yield",
    "lambda",
    "while",
)
# Pure-Python standard library modules used as code (whole files, comments and docstrings kept).
CODE_MODULES: tuple[str, ...] = (
    "textwrap",
    "heapq",
    "bisect",
    "colorsys",
    "graphlib",
    "shlex",
    "fractions",
    "string",
    "fnmatch",
    "glob",
    "keyword",
    "queue",
    "sched",
    "statistics",
)
# Sphinx translations: (locale dir, language name used in chat turns).
LANGUAGES: tuple[tuple[str, str], ...] = (
    ("de", "German"),
    ("fr", "French"),
    ("es", "Spanish"),
    ("it", "Italian"),
    ("pt_BR", "Brazilian Portuguese"),
    ("ru", "Russian"),
    ("ja", "Japanese"),
    ("zh_CN", "Simplified Chinese"),
    ("ko", "Korean"),
    ("pl", "Polish"),
    ("nl", "Dutch"),
    ("tr", "Turkish"),
    ("el", "Greek"),
    ("ar", "Arabic"),
    ("hi", "Hindi"),
    ("sv", "Swedish"),
    ("cs", "Czech"),
    ("uk_UA", "Ukrainian"),
    ("vi", "Vietnamese"),
    ("he", "Hebrew"),
)
BLOCK_CHARS = 3000  # interleave sources in blocks so every chunk range sees a mix
TURN = "<|turn>{role}\n{text}<turn|>\n"  # ref: llama.cpp common/parsers/gemma4.cpp (the turn markers)


def _po_unquote(lines: list[str]) -> str:
    out = []
    for line in lines:
        s = line.strip()
        if s.startswith('"') and s.endswith('"'):
            out.append(
                bytes(s[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
            )
    return "".join(out)


def read_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs with a non-empty translation; plural and header entries skipped."""
    pairs: list[tuple[str, str]] = []
    for entry in re.split(r"\n\s*\n", text):
        if "msgid_plural" in entry or entry.lstrip().startswith("#~"):
            continue
        m = re.search(r"^msgid (.*?)^msgstr (.*)", entry, flags=re.DOTALL | re.MULTILINE)
        if not m:
            continue
        msgid = _po_unquote(m.group(1).splitlines())
        msgstr = _po_unquote(m.group(2).splitlines())
        if msgid and msgstr and msgid != msgstr:
            pairs.append((msgid, msgstr))
    return pairs


def _blocks(text: str) -> list[str]:
    """Split at paragraph (blank line) boundaries into blocks of about BLOCK_CHARS."""
    blocks, cur = [], ""
    for para in re.split(r"(?<=\n)\n", text):
        cur += para + "\n"
        if len(cur) >= BLOCK_CHARS:
            blocks.append(cur)
            cur = ""
    if cur.strip():
        blocks.append(cur)
    return blocks


def build(sphinx_wheel: Path) -> str:
    from pydoc_data import topics

    prose = "".join(topics.topics[k].strip() + "\n\n" for k in PROSE_TOPICS)
    code = ""
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise SystemExit(f"standard library module {name!r} not found")
        code += f"# ---- Lib/{name}.py (CPython {sys.version.split()[0]}) ----\n"
        code += Path(spec.origin).read_text(encoding="utf-8") + "\n"
    multilingual, chat = "", ""
    with zipfile.ZipFile(sphinx_wheel) as zf:
        for loc, lang in LANGUAGES:
            pairs = read_po(zf.read(f"sphinx/locale/{loc}/LC_MESSAGES/sphinx.po").decode("utf-8"))
            multilingual += "".join(f"{t}\n" for _, t in pairs[:160]) + "\n"
            chat += "".join(
                TURN.format(role="user", text=f"Translate into {lang}: {src}")
                + TURN.format(role="model", text=dst)
                for src, dst in pairs[160:190]
            )
    for k in ("for", "if", "return", "del", "pass", "break", "continue", "dict", "lists", "else"):
        chat += TURN.format(role="user", text=f"What does the Python reference say about `{k}`?")
        chat += TURN.format(role="model", text=topics.topics[k].strip())
    streams = [_blocks(s) for s in (prose, code, multilingual, chat)]
    out: list[str] = []
    while any(streams):
        for s in streams:
            if s:
                out.append(s.pop(0))
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sphinx-wheel", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("default.txt"))
    a = ap.parse_args()
    text = build(a.sphinx_wheel)
    with atomic_output(a.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    data = a.out.read_bytes()
    print(
        f"{a.out}: {len(data)} bytes, {len(text)} chars, sha256 {hashlib.sha256(data).hexdigest()}"
    )


if __name__ == "__main__":
    main()
