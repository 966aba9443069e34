"""Model card: data (frozen dataclasses), rendering from `model_card.md.j2`, validation.

Every number on the card comes from the data passed in: file sizes from the published
files, sampling settings, context and KV geometry from the GGUF's metadata (`facts.py`),
evaluation tables from the release's results. The template only lays them out.

The YAML front matter is written by `huggingface_hub.ModelCardData` (so quoting and key
order match what the Hub writes itself) and the rendered card is parsed back with
`huggingface_hub.ModelCard` before it is returned.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from qatgguf.errors import ModelCardError
from qatgguf.evaluate.tables import EvalTable

TEMPLATE = "model_card.md.j2"
REQUIRED_TAGS = ("gguf", "llama.cpp")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# License ids the Hub takes that are SPDX identifiers (lower case, as the Hub spells
# them). Any other id ("gemma", "llama3", "other") needs a license_link.
SPDX_LICENSES = frozenset(
    {
        "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc",
        "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0",
        "cc-by-nd-4.0", "cc-by-nc-nd-4.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0",
        "agpl-3.0", "mpl-2.0", "epl-2.0", "unlicense", "artistic-2.0", "zlib", "wtfpl",
    }
)


@dataclass(frozen=True)
class CardFile:
    """One file of the repo as the card lists it. `path` is the path in the repo;
    `release` the release that published it; `note` says why an older file stays."""

    path: str
    size: int
    quant: str | None = None
    kind: Literal["model", "mmproj"] = "model"
    sha256: str | None = None
    release: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Sampling:
    """Recommended sampling settings (from generation_config.json, via the GGUF)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None

    def flags(self) -> str:
        """The llama.cpp options that apply them."""
        parts = []
        for flag, value in (
            ("--temp", self.temperature),
            ("--top-p", self.top_p),
            ("--top-k", self.top_k),
            ("--min-p", self.min_p),
        ):
            if value is not None:
                parts.append(f"{flag} {value}")
        return " ".join(parts)

    def lines(self) -> tuple[str, ...]:
        names = (("temperature", self.temperature), ("top_p", self.top_p),
                 ("top_k", self.top_k), ("min_p", self.min_p))
        return tuple(f"`{n} = {v}`" for n, v in names if v is not None)


@dataclass(frozen=True)
class RunInfo:
    """What it takes to run the files: the model's maximum context, the context the
    commands use, the KV cache at each stated context (bytes) and the formula behind it,
    sampling and whether the chat template has a thinking switch."""

    max_context: int
    context: int
    kv_cache: tuple[tuple[int, int], ...]  # (context, bytes)
    kv_formula: str
    sampling: Sampling = Sampling()
    thinking_switch: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_cache", tuple(tuple(x) for x in self.kv_cache))
        if not 0 < self.context <= self.max_context:
            raise ModelCardError(
                f"run info: context {self.context} must be in [1, {self.max_context}] "
                "(the model's maximum context)"
            )
        if self.context not in {c for c, _ in self.kv_cache}:
            raise ModelCardError(
                f"run info: the KV cache at the commands' context {self.context} is missing"
            )


@dataclass(frozen=True)
class EvalMethod:
    """How the evaluation tables were measured, and how to reproduce one row."""

    corpus: str
    corpus_sha256: str
    ctx: int
    n_chunks: int
    n_tokens: int
    llama_cpp_commit: str
    commands: tuple[str, ...]


@dataclass(frozen=True)
class CardPlot:
    """An image committed beside the card and embedded with a relative link."""

    path: str
    alt: str
    caption: str = ""

    def __post_init__(self) -> None:
        if "/" in self.path or not re.fullmatch(r"[\w.-]+\.png", self.path):
            raise ModelCardError(
                f"plot {self.path!r}: must be a .png file name beside README.md"
            )


@dataclass(frozen=True)
class CardData:
    """Everything the model card shows."""

    repo_id: str
    base_model: str
    license: str
    files: tuple[CardFile, ...]
    tables: tuple[EvalTable, ...] = ()
    quantized_by: str = "qatgguf"
    pipeline_tag: str = "image-text-to-text"
    tags: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    license_link: str | None = None
    title: str | None = None
    description: str = ""
    primary_quant: str | None = None  # the quant the commands use; default: first model file
    bf16_size: int | None = None  # the BF16 GGUF of the same checkpoint, for the size table
    run: RunInfo | None = None
    method: EvalMethod | None = None
    plot: CardPlot | None = None
    collection_title: str | None = None
    collection_url: str | None = None
    release_id: str | None = None
    extra_metadata: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        # Tuples keep the dataclass hashable and immutable even when built from lists.
        for name in ("files", "tables", "tags", "language", "extra_metadata"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        validate_card_data(self)

    @property
    def model_files(self) -> tuple[CardFile, ...]:
        return tuple(f for f in self.files if f.kind == "model")

    @property
    def mmproj_files(self) -> tuple[CardFile, ...]:
        return tuple(f for f in self.files if f.kind == "mmproj")

    @property
    def primary(self) -> CardFile:
        """The model file the usage commands use (first file of a split set)."""
        files = self.model_files
        if self.primary_quant is not None:
            files = tuple(f for f in files if f.quant == self.primary_quant) or files
        for f in files:
            if hf_quant_matches(f.path, f.quant or ""):
                return f
        return files[0]


def hf_quant_matches(path: str, quant: str) -> bool:
    """Whether `llama-cli -hf repo:QUANT` picks this file.

    ref: llama.cpp common/download.cpp find_best_model: regex `QUANT[.-]` (icase) over
    files whose name does not contain "mmproj"; of a split set only part 00001.
    """
    name = path.rsplit("/", 1)[-1]
    if "mmproj" in name or not name.endswith(".gguf"):
        return False
    if re.search(r"-(\d{5})-of-(\d{5})\.gguf$", name) and not re.search(r"-00001-of-", name):
        return False
    return re.search(re.escape(quant) + r"[.-]", name, re.IGNORECASE) is not None


def validate_card_data(card: CardData) -> None:
    """Raise ModelCardError naming the field, the rule and the fix."""
    where = f"model card for {card.repo_id!r}"
    if not _REPO_ID_RE.match(card.repo_id):
        raise ModelCardError(f"{where}: repo_id must be 'org/name'; got {card.repo_id!r}")
    if not _REPO_ID_RE.match(card.base_model):
        raise ModelCardError(
            f"{where}: base_model must be the Hub id 'org/name' of the QAT checkpoint; "
            f"got {card.base_model!r}"
        )
    if not card.license:
        raise ModelCardError(f"{where}: license is empty; use the base model's license id")
    if card.license not in SPDX_LICENSES and not card.license_link:
        raise ModelCardError(
            f"{where}: license {card.license!r} is not an SPDX id, so the card needs "
            "license_link (the URL of the license text); set publish.license_link"
        )
    if not card.model_files:
        raise ModelCardError(f"{where}: no model file listed; a card needs at least one GGUF")
    seen: set[str] = set()
    for f in card.files:
        if f.path in seen:
            raise ModelCardError(f"{where}: file {f.path!r} is listed twice")
        seen.add(f.path)
        if f.size < 0:
            raise ModelCardError(f"{where}: file {f.path!r} has a negative size {f.size}")
        if f.kind == "model":
            if not f.quant:
                raise ModelCardError(
                    f"{where}: model file {f.path!r} has no quant; set quant (e.g. 'Q4_0')"
                )
            if re.search(r"-000(0[2-9]|[1-9]\d)-of-", f.path):
                continue  # later parts of a split set: -hf loads them from part 00001
            if not hf_quant_matches(f.path, f.quant):
                raise ModelCardError(
                    f"{where}: model file {f.path!r} would not be found by "
                    f"`llama-cli -hf {card.repo_id}:{f.quant}` (llama.cpp looks for "
                    f"'{f.quant}.' or '{f.quant}-' in the name); name it like "
                    f"'model-{f.quant}.gguf'"
                )
        elif "mmproj" not in f.path.rsplit("/", 1)[-1]:
            raise ModelCardError(
                f"{where}: mmproj file {f.path!r} must have 'mmproj' in its name, or "
                "llama.cpp will not download it with -hf; name it like 'mmproj-BF16.gguf'"
            )
    if card.bf16_size is not None and card.bf16_size <= 0:
        raise ModelCardError(f"{where}: bf16_size must be positive, got {card.bf16_size}")
    if card.run is not None:
        for ctx, nbytes in card.run.kv_cache:
            if ctx < 1 or nbytes < 0:
                raise ModelCardError(f"{where}: KV cache entry ({ctx}, {nbytes}) is not valid")
    if card.method is not None:
        m = card.method
        if not re.fullmatch(r"[0-9a-f]{64}", m.corpus_sha256):
            raise ModelCardError(
                f"{where}: corpus sha256 {m.corpus_sha256!r} is not 64 hex digits"
            )
        if min(m.ctx, m.n_chunks, m.n_tokens) < 1:
            raise ModelCardError(f"{where}: evaluation method has an empty context/chunk/token count")
    if (card.collection_url is None) != (card.collection_title is None):
        raise ModelCardError(f"{where}: give both collection_title and collection_url, or neither")


def human_size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def human_context(n: int) -> str:
    """131072 -> 128K, 262144 -> 256K, 8192 -> 8K, 300 -> 300."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def size_rows(card: CardData) -> list[tuple[str, str, str, str]]:
    """(quant, size, BF16 size, saved %) per model quant: split sets summed."""
    sizes: dict[str, int] = {}
    for f in card.model_files:
        sizes[f.quant or "?"] = sizes.get(f.quant or "?", 0) + f.size
    rows = []
    for quant, size in sizes.items():
        if card.bf16_size:
            saved = f"{100.0 * (1.0 - size / card.bf16_size):.2f}%"
            rows.append((quant, human_size(size), human_size(card.bf16_size), saved))
        else:
            rows.append((quant, human_size(size), "—", "—"))
    return rows


def memory_rows(card: CardData) -> list[tuple[str, ...]]:
    """Per model quant: file size + KV cache at each stated context."""
    if card.run is None:
        return []
    sizes: dict[str, int] = {}
    for f in card.model_files:
        sizes[f.quant or "?"] = sizes.get(f.quant or "?", 0) + f.size
    return [
        (quant, human_size(size), *(human_size(size + kv) for _, kv in card.run.kv_cache))
        for quant, size in sizes.items()
    ]


@dataclass(frozen=True)
class UsageBlock:
    title: str
    command: str


def usage_blocks(card: CardData) -> tuple[UsageBlock, ...]:
    """The commands of the usage section, computed from the files and run info."""
    first = card.primary
    quant = first.quant or ""
    name = card.repo_id.split("/", 1)[1]
    mmproj = card.mmproj_files[0].path if card.mmproj_files else None
    run = card.run
    settings = ""
    if run is not None:
        settings = " ".join(x for x in (run.sampling.flags(), f"--ctx-size {run.context}") if x)
    cont = " \\\n    "

    def cmd(*parts: str) -> str:
        return cont.join(p for p in parts if p)

    include = [f'"*{quant}*"']
    if mmproj:
        include.append(f'"*{mmproj.removesuffix(".gguf")}*"')
    blocks = [
        UsageBlock(
            "Download the files",
            cmd(f"hf download {card.repo_id} --include {' '.join(include)}",
                f"--local-dir {name}"),
        ),
        UsageBlock(
            "Chat in the terminal (llama.cpp downloads the files itself with `-hf`)",
            cmd(f"llama-cli -hf {card.repo_id}:{quant}", settings),
        ),
        UsageBlock(
            "Serve an OpenAI-compatible API on port 8080",
            cmd(f"llama-server -hf {card.repo_id}:{quant}", settings, "--port 8080"),
        ),
        UsageBlock(
            "Run the downloaded files",
            cmd(f"llama-cli -m {name}/{first.path}",
                f"--mmproj {name}/{mmproj}" if mmproj else "", settings),
        ),
    ]
    if mmproj:
        blocks.append(
            UsageBlock(
                "Describe an image (vision through the mmproj)",
                cmd(f"llama-mtmd-cli -m {name}/{first.path}", f"--mmproj {name}/{mmproj}",
                    "--image photo.jpg", '-p "Describe this image."', settings),
            )
        )
    return tuple(blocks)


def thinking_commands(card: CardData) -> tuple[str, str] | None:
    """(on, off) llama-server commands, where the chat template has a thinking switch."""
    if card.run is None or not card.run.thinking_switch:
        return None
    base = f"llama-server -hf {card.repo_id}:{card.primary.quant}"
    on = shlex.quote('{"enable_thinking":true}')
    off = shlex.quote('{"enable_thinking":false}')
    return (f"{base} --chat-template-kwargs {on}", f"{base} --chat-template-kwargs {off}")


def card_metadata(card: CardData) -> ModelCardData:
    tags = list(REQUIRED_TAGS) + [t for t in card.tags if t not in REQUIRED_TAGS]
    extra = dict(card.extra_metadata)
    return ModelCardData(
        base_model=card.base_model,
        license=card.license,
        license_link=card.license_link,
        language=list(card.language) or None,
        library_name="gguf",
        pipeline_tag=card.pipeline_tag,
        tags=tags,
        quantized_by=card.quantized_by,
        base_model_relation="quantized",
        **extra,
    )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(
            lambda name: resources.files("qatgguf.hub").joinpath(name).read_text("utf-8")
        ),
        undefined=jinja2.StrictUndefined,  # a typo in the template fails, not renders blank
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters["human_size"] = human_size
    env.filters["human_context"] = human_context
    return env


def render_card(card: CardData, *, template: str = TEMPLATE) -> str:
    """Render README.md for the repo. Raises ModelCardError if the result is not a valid card."""
    meta = card_metadata(card)
    name = card.repo_id.split("/", 1)[1]
    text = (
        _environment()
        .get_template(template)
        .render(
            card=card,
            front_matter=meta.to_yaml(),
            title=card.title or name,
            model_files=card.model_files,
            mmproj_files=card.mmproj_files,
            sizes=size_rows(card),
            memory=memory_rows(card),
            usage=usage_blocks(card),
            thinking=thinking_commands(card),
            releases=sorted({f.release for f in card.files if f.release}),
        )
    )
    text = re.sub(r"\n{3,}", "\n\n", text)
    check_card(text, expect=meta.to_dict())
    return text


def check_card(text: str, *, expect: dict[str, Any] | None = None) -> ModelCard:
    """Parse the card as the Hub client does; check the metadata the Hub needs."""
    try:
        parsed = ModelCard(text)
    except ValueError as exc:
        raise ModelCardError(f"README.md: front matter is not valid card metadata: {exc}") from None
    data = parsed.data.to_dict()
    for key in ("base_model", "license", "tags", "pipeline_tag", "quantized_by"):
        if not data.get(key):
            raise ModelCardError(f"README.md: front matter lacks {key!r}; set it in CardData")
    missing = [t for t in REQUIRED_TAGS if t not in data["tags"]]
    if missing:
        raise ModelCardError(f"README.md: tags lack {missing}; the Hub lists GGUFs by these tags")
    if data.get("base_model_relation") != "quantized":
        raise ModelCardError("README.md: base_model_relation must be 'quantized'")
    if data["license"] not in SPDX_LICENSES and not data.get("license_link"):
        raise ModelCardError(
            f"README.md: license {data['license']!r} is not an SPDX id and has no license_link"
        )
    if expect is not None and data != expect:
        raise ModelCardError(
            f"README.md: front matter parsed back differs from the card data "
            f"({data!r} != {expect!r}); check the template's front matter block"
        )
    return parsed
