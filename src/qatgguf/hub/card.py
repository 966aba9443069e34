"""Model card: data (frozen dataclasses), rendering from `model_card.md.j2`, validation.

The YAML front matter is written by `huggingface_hub.ModelCardData` (so quoting and key
order match what the Hub writes itself) and the rendered card is parsed back with
`huggingface_hub.ModelCard` before it is returned.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from qatgguf.errors import ModelCardError

TEMPLATE = "model_card.md.j2"
REQUIRED_TAGS = ("gguf", "llama.cpp")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class CardFile:
    """One file of the repo as the card lists it. `path` is the path in the repo."""

    path: str
    size: int
    quant: str | None = None
    kind: Literal["model", "mmproj"] = "model"
    sha256: str | None = None


@dataclass(frozen=True)
class EvalRow:
    """One row of the evaluation table. None renders as a dash (e.g. the BF16 reference)."""

    model: str
    method: str
    size: int
    mean_kld: float | None = None
    kld_p999: float | None = None
    top1_pct: float | None = None
    ppl: float | None = None
    passed: bool | None = None  # False: measured but failed the gate, so not in the repo


@dataclass(frozen=True)
class UsageCommand:
    title: str
    command: str


@dataclass(frozen=True)
class CardData:
    """Everything the model card shows. `usage` empty means: the standard llama.cpp commands."""

    repo_id: str
    base_model: str
    license: str
    files: tuple[CardFile, ...]
    eval_rows: tuple[EvalRow, ...] = ()
    quantized_by: str = "qatgguf"
    pipeline_tag: str = "image-text-to-text"
    tags: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    license_link: str | None = None
    title: str | None = None
    description: str = ""
    eval_notes: str = ""
    usage: tuple[UsageCommand, ...] = ()
    extra_metadata: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        # Tuples keep the dataclass hashable and immutable even when built from lists.
        for name in ("files", "eval_rows", "tags", "language", "usage", "extra_metadata"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        validate_card_data(self)

    @property
    def model_files(self) -> tuple[CardFile, ...]:
        return tuple(f for f in self.files if f.kind == "model")

    @property
    def mmproj_files(self) -> tuple[CardFile, ...]:
        return tuple(f for f in self.files if f.kind == "mmproj")


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
    for row in card.eval_rows:
        for name in ("mean_kld", "kld_p999", "top1_pct", "ppl"):
            value = getattr(row, name)
            if value is not None and not math.isfinite(value):
                raise ModelCardError(
                    f"{where}: eval row {row.model!r} has {name}={value}; metrics must be "
                    "finite (use None for not measured)"
                )


def human_size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}%"


def default_usage(card: CardData) -> tuple[UsageCommand, ...]:
    """llama.cpp commands for the first model file (the `-hf` form and the local form)."""
    first = card.model_files[0]
    quant = first.quant
    mmproj = card.mmproj_files[0].path if card.mmproj_files else None
    local = f"llama-cli -m {first.path}" + (f" --mmproj {mmproj}" if mmproj else "")
    commands = [
        UsageCommand("Chat in the terminal", f"llama-cli -hf {card.repo_id}:{quant}"),
        UsageCommand(
            "Serve an OpenAI-compatible API on port 8080",
            f"llama-server -hf {card.repo_id}:{quant} --port 8080",
        ),
        UsageCommand("Run downloaded files", local),
    ]
    if mmproj:
        commands.append(
            UsageCommand(
                "Describe an image",
                f"llama-mtmd-cli -m {first.path} --mmproj {mmproj} --image photo.jpg "
                '-p "Describe this image."',
            )
        )
    return tuple(commands)


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
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    return env


def render_card(card: CardData, *, template: str = TEMPLATE) -> str:
    """Render README.md for the repo. Raises ModelCardError if the result is not a valid card."""
    meta = card_metadata(card)
    name = card.repo_id.split("/", 1)[1]
    intro = (
        f"GGUF files of [{card.base_model}](https://huggingface.co/{card.base_model}) "
        "for llama.cpp, converted from the QAT checkpoint so the 4-bit weights stay on "
        "the grid they were trained for."
    )
    text = (
        _environment()
        .get_template(template)
        .render(
            card=card,
            front_matter=meta.to_yaml(),
            title=card.title or name,
            intro=intro,
            model_files=card.model_files,
            mmproj_files=card.mmproj_files,
            usage=card.usage or default_usage(card),
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
    if expect is not None and data != expect:
        raise ModelCardError(
            f"README.md: front matter parsed back differs from the card data "
            f"({data!r} != {expect!r}); check the template's front matter block"
        )
    return parsed
