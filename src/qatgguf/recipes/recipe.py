"""Recipes: which GGML type (and which grid) each GGUF tensor gets.

A recipe file holds ordered rules; the first rule whose regex matches the GGUF tensor name
(and whose `min_dims`/`max_dims` admit its shape, and whose `when:` facts hold for the
model, e.g. `when: {n_expert: 8}`) decides the type, otherwise `default`.
`extends:` pulls in the rules of another file after this file's own `first:` rules and
before its `rules:`, so a shared base (what llama.cpp always keeps in F32) is written once.
A type whose block size does not divide the row length falls back as llama-quantize does
(ref: src/llama-quant.cpp tensor_type_fallback).

Grids: `grid: qat` keeps the QAT grid of the chosen type (Q4_0, TQ2_0, Q8_0). `grid: auto`
(on a rule, or for the whole recipe) leaves the type to detection, per tensor, on the full
tensor (`qatgguf lattice`, `quant.lattice.detect_grid`): the coarsest grid the tensor sits
on among TQ2_0, Q4_0 and Q8_0 (those whose block divides the row), written on that grid;
a tensor on no grid gets the type the rules chose, as llama-quantize would. At recipe
level `grid: auto` applies to every tensor whose chosen type is block-quantized (never to
the F32/F16/BF16 tensors llama.cpp keeps unquantized).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml
from gguf import GGMLQuantizationType

from qatgguf.errors import ConfigError
from qatgguf.quant.registry import FALLBACK_TYPES, type_size

RECIPE_VERSION = 1
GRID_MODES = ("qat", "auto")
# The grids `grid: auto` chooses from, coarsest first (ref: quant/lattice.py detect_grid).
AUTO_GRID_TYPES: tuple[str, ...] = ("TQ2_0", "Q4_0", "Q8_0")
# Model facts a rule's `when:` may test (the plan passes them from the model's config).
FACTS = ("n_expert",)
_UNQUANTIZED = ("F32", "F16", "BF16")


def _block(qtype: str) -> int:
    """Elements per block of the type named `qtype` (the one type table, quant.registry)."""
    return type_size(GGMLQuantizationType[qtype])[0]


@dataclass(frozen=True)
class TensorChoice:
    """The type of one tensor. With `grid="auto"`, `qtype` is the type for a tensor on no
    grid and `candidates` the grid types detection may choose instead (coarsest first)."""

    qtype: str  # GGMLQuantizationType name, e.g. "Q4_0"
    grid: Literal["qat", "auto"] | None = None
    rule: str | None = None  # the pattern that decided it (None: the default)
    candidates: tuple[str, ...] = ()

    @property
    def allowed(self) -> tuple[str, ...]:
        """Every type the tensor may end up with."""
        return (*self.candidates, self.qtype) if self.grid == "auto" else (self.qtype,)


@dataclass(frozen=True)
class Rule:
    pattern: str
    qtype: str
    grid: Literal["qat", "auto"] | None = None
    min_dims: int = 0
    max_dims: int = 99
    optional: bool = False  # a rule that may match nothing in a given model
    why: str = ""
    when: tuple[tuple[str, int], ...] = ()  # model facts that must hold, e.g. (("n_expert", 8),)

    def matches(self, name: str, shape: Sequence[int], facts: Mapping[str, int] | None = None) -> bool:
        if self.when and any((facts or {}).get(k) != v for k, v in self.when):
            return False
        return self.min_dims <= len(shape) <= self.max_dims and re.search(self.pattern, name) is not None


def _type_name(value: Any, where: str) -> str:
    name = str(value).upper()
    if name not in GGMLQuantizationType.__members__:
        raise ConfigError(f"{where}: unknown GGML type {value!r}; use one of "
                          f"{', '.join(GGMLQuantizationType.__members__)}")
    return name


def _grid(value: Any, where: str) -> Literal["qat", "auto"] | None:
    if value not in (None, *GRID_MODES):
        raise ConfigError(f"{where}: grid must be absent, 'qat' or 'auto', got {value!r}")
    return value


def _when(value: Any, where: str) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise ConfigError(f"{where}: `when` must map model facts to integers, e.g. {{n_expert: 8}}; "
                          f"got {value!r}")
    unknown = sorted(set(value) - set(FACTS))
    if unknown:
        raise ConfigError(f"{where}: `when` tests unknown model facts {unknown}; known: {list(FACTS)}")
    return tuple(sorted(value.items()))


def _rule(item: dict[str, Any], where: str) -> Rule:
    allowed = {"pattern", "type", "grid", "min_dims", "max_dims", "optional", "why", "when"}
    if not isinstance(item, dict) or "pattern" not in item or "type" not in item:
        raise ConfigError(f"{where}: each rule needs `pattern` and `type`, got {item!r}")
    extra = set(item) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown rule fields {sorted(extra)}; allowed: {sorted(allowed)}")
    try:
        re.compile(item["pattern"])
    except re.error as exc:
        raise ConfigError(f"{where}: pattern {item['pattern']!r} is not a valid regex: {exc}") from None
    return Rule(pattern=item["pattern"], qtype=_type_name(item["type"], where),
                grid=_grid(item.get("grid"), where),
                min_dims=int(item.get("min_dims", 0)), max_dims=int(item.get("max_dims", 99)),
                optional=bool(item.get("optional", False)), why=str(item.get("why", "")),
                when=_when(item.get("when"), where))


@dataclass(frozen=True)
class Recipe:
    name: str
    file_type: str  # llama_ftype name written to general.file_type, e.g. "MOSTLY_Q4_0"
    default: str
    default_grid: Literal["qat"] | None = None
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    description: str = ""
    version: int = RECIPE_VERSION
    auto: bool = False  # recipe-level `grid: auto`

    def choose(self, gguf_name: str, shape: Sequence[int], *,
               facts: Mapping[str, int] | None = None) -> TensorChoice:
        """Type for one tensor. `shape` is row-major (numpy) order: `shape[-1]` is the row.
        `facts` are the model facts rules may test (`when:`), e.g. {"n_expert": 8}."""
        choice = TensorChoice(self.default, self.default_grid, None)
        for rule in self.rules:
            if rule.matches(gguf_name, shape, facts):
                choice = TensorChoice(rule.qtype, rule.grid, rule.pattern)
                break
        choice = self._fit(choice, shape)
        if choice.grid == "auto" or (self.auto and choice.grid is None and choice.qtype not in _UNQUANTIZED):
            return self._auto(choice, shape)
        return choice

    @staticmethod
    def _auto(choice: TensorChoice, shape: Sequence[int]) -> TensorChoice:
        ncols = int(shape[-1]) if shape else 1
        cands = tuple(t for t in AUTO_GRID_TYPES
                      if len(shape) >= 2 and ncols % _block(t) == 0)
        if not cands:
            return TensorChoice(choice.qtype, None, choice.rule)
        return TensorChoice(choice.qtype, "auto", choice.rule, cands)

    @staticmethod
    def _fit(choice: TensorChoice, shape: Sequence[int]) -> TensorChoice:
        qtype = choice.qtype
        ncols = int(shape[-1]) if shape else 1
        block = _block(qtype)
        if ncols % block == 0:
            return choice
        qtype = FALLBACK_TYPES.get(qtype, qtype)
        if ncols % _block(qtype):
            qtype = "F16"
        # a fallback type is off the QAT grid by construction (detection still may find one)
        grid = choice.grid if choice.grid == "auto" or qtype == choice.qtype else None
        return TensorChoice(qtype, grid, choice.rule)

    def check_coverage(self, names_shapes: Iterable[tuple[str, Sequence[int]]], *,
                       facts: Mapping[str, int] | None = None) -> None:
        """Raise `ConfigError` naming every non-optional rule that matches no tensor."""
        items = list(names_shapes)
        unused = [r.pattern for r in self.rules
                  if not r.optional and not any(r.matches(n, s, facts) for n, s in items)]
        if unused:
            raise ConfigError(
                f"recipe {self.name!r}: pattern(s) {unused} match no tensor of this model; fix the "
                "pattern or mark the rule `optional: true`")


def _read(name: str) -> dict[str, Any]:
    files = resources.files("qatgguf.recipes")
    res = files.joinpath(f"{name}.yaml")
    if not res.is_file():
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(available_recipes())}")
    data = yaml.safe_load(res.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {name}.yaml is not a mapping")
    return data


def available_recipes() -> list[str]:
    files = resources.files("qatgguf.recipes")
    return sorted(p.name[:-5] for p in files.iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


def _rules_of(name: str, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[Rule]]:
    if name in seen:
        raise ConfigError(f"recipe {name!r} extends itself through {' -> '.join(seen)}")
    data = _read(name)
    allowed = {"name", "version", "description", "file_type", "default", "grid", "extends",
               "first", "rules"}
    extra = set(data) - allowed
    if extra:
        raise ConfigError(f"recipe {name!r}: unknown fields {sorted(extra)}; allowed: {sorted(allowed)}")
    if int(data.get("version", RECIPE_VERSION)) != RECIPE_VERSION:
        raise ConfigError(f"recipe {name!r}: version {data.get('version')} is not {RECIPE_VERSION}")
    rules = [_rule(r, f"recipe {name!r}") for r in data.get("first") or []]
    if data.get("extends"):
        rules += _rules_of(str(data["extends"]), seen + (name,))[1]
    rules += [_rule(r, f"recipe {name!r}") for r in data.get("rules") or []]
    return data, rules


def recipe_sources(name: str) -> dict[str, str]:
    """{file name: text} of a recipe and every recipe it extends: what decides its choices
    (and so what a content key of its outputs covers)."""
    out: dict[str, str] = {}
    while name and name not in out:
        res = resources.files("qatgguf.recipes").joinpath(f"{name}.yaml")
        if not res.is_file():
            raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(available_recipes())}")
        out[name] = res.read_text(encoding="utf-8")
        name = str((yaml.safe_load(out[name]) or {}).get("extends") or "")
    return out


def load_recipe(name: str) -> Recipe:
    """Load `recipes/<name>.yaml`. Raises `ConfigError` for an unknown name or bad data."""
    data, rules = _rules_of(name)
    for key in ("default", "file_type"):
        if key not in data:
            raise ConfigError(f"recipe {name!r} lacks `{key}`")
    grid = _grid(data.get("grid"), f"recipe {name!r}")
    return Recipe(name=name, file_type=str(data["file_type"]),
                  default=_type_name(data["default"], f"recipe {name!r}"),
                  default_grid="qat" if grid == "qat" else None, rules=tuple(rules),
                  description=str(data.get("description", "")), auto=grid == "auto")
