"""Release configuration: which models, from where, which recipes, which gate, where to.

A release config is YAML validated on load; unknown keys are rejected so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qatgguf.errors import ConfigError

CONFIG_VERSION = 1

# A model source: a local directory, `tiny://<name>` (the built-in tiny family),
# `hf://org/repo@revision` or `s3://bucket/prefix`.
_SOURCE_RE = re.compile(r"^(tiny://[\w.-]+|hf://[\w.-]+/[\w.-]+(@[\w./-]+)?|s3://[a-z0-9.-]{3,63}(/.*)?|[^:]+)$")
_REPO_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateConfig(_Strict):
    """The release gate's thresholds: publish a file only if every figure is within its
    bound (llama-perplexity's numbers). `None` switches a check off
    (`qatgguf.evaluate.gate.apply_gate` applies them)."""

    max_mean_kld: float | None = Field(0.05, ge=0)
    max_kld_99_9: float | None = Field(1.0, ge=0)
    min_same_top_p: float | None = Field(0.85, ge=0)  # a fraction, not percent
    max_ppl_ratio: float | None = Field(1.10, ge=1)

    @field_validator("min_same_top_p")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and v > 1:
            raise ValueError(f"min_same_top_p={v:g} is a fraction in [0, 1]; write {v / 100:g} for {v:g}%")
        return v


class EvalConfig(_Strict):
    corpus: str | None = None  # None: the corpus shipped with qatgguf
    ctx: int = Field(256, ge=16)
    chunks: int | None = Field(None, ge=1)
    chunk_tasks: int = Field(2, ge=1)  # evaluation tasks per quant (chunk ranges)
    batch: int = Field(2048, ge=1)  # llama-perplexity -b: chunks per batch = batch / ctx
    threads: int = Field(1, ge=1)

    def range_tasks(self) -> int:
        """Evaluation tasks per file: `chunk_tasks`, but never more than the batches of
        `chunks` (ranges start on batch boundaries, so a range holds whole batches)."""
        if self.chunks is None:
            return self.chunk_tasks
        n_seq = max(1, self.batch // self.ctx)
        return max(1, min(self.chunk_tasks, -(-self.chunks // n_seq)))


class StoreConfig(_Strict):
    url: str = "runs/store"  # local path, file:///…, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint; credentials come from the AWS chain


# ref: Hugging Face Hub storage limits: 50 GB per file (split larger GGUFs with gguf-split)
HUB_FILE_LIMIT = 50 * 1000**3
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size like `50G`, `2G`, `512M` (decimal units, as gguf-split's
    --split-max-size reads them)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value).strip())
    if not m:
        raise ValueError(f"size {value!r} is not a byte count or a number with K, M, G or T (e.g. 50G)")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


class PublishConfig(_Strict):
    target: Literal["local", "hub"] = "local"
    local_root: str = "runs/hub"
    endpoint: str | None = None  # Hub endpoint; the token comes from HF_TOKEN
    private: bool = False  # true: the repos must be private (checked before each commit)
    # files above this are written as gguf-split parts (<name>-00001-of-0000N.gguf)
    split_max_size: int = Field(HUB_FILE_LIMIT, ge=1024 * 1024)
    # The family's collection ("Gemma 4 QAT"), created if missing, in the repo owner's
    # namespace; None: no collection.
    collection: str | None = None
    license_link: str | None = None  # URL of the license text; needed when license is not SPDX
    languages: tuple[str, ...] = ()  # card metadata `language`, when the models list them
    # The context the card's commands use and its memory line states (capped at the
    # model's maximum, which the card states too).
    card_context: int = Field(32768, ge=256)
    max_attempts: int = Field(6, ge=1)  # commit attempts per publish (412, 429, 5xx, drops)
    max_seconds: float = Field(900.0, gt=0)  # time budget of one publish, waits included

    @field_validator("collection")
    @classmethod
    def _collection(cls, v: str | None) -> str | None:
        if v is not None and not (0 < len(v.strip()) <= 60):
            raise ValueError("collection title must be 1 to 60 characters (or null for none)")
        return v

    @field_validator("license_link")
    @classmethod
    def _license_link(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://\S+$", v):
            raise ValueError(f"license_link {v!r} must be an http(s) URL")
        return v

    @field_validator("languages")
    @classmethod
    def _languages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [x for x in v if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", x)]
        if bad:
            raise ValueError(f"languages {bad} are not ISO 639 codes like 'en' or 'pt-BR'")
        return v

    @field_validator("split_max_size", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        return parse_size(v)  # type: ignore[arg-type]


class SourcesConfig(_Strict):
    """Where sources are read from (credentials come from each machine's environment)."""

    hf_endpoint: str | None = None  # None: HF_ENDPOINT, else the Hub
    s3_endpoint: str | None = None  # None: the store's endpoint_url


class RayConfig(_Strict):
    address: str = "local"  # "local" starts a private instance; "auto" or host:port joins one
    num_cpus: int | None = None
    shard_cpus: int = Field(1, ge=1)  # CPUs per shard task (the kernels quantize rows in threads)


def _check_source(v: str) -> str:
    if not _SOURCE_RE.match(v):
        raise ValueError(f"source {v!r} is not a local path, tiny://NAME, hf://org/repo@rev or s3://bucket/prefix")
    return v


class VariantConfig(_Strict):
    """Another checkpoint of the model whose files go into the model's repo and card (the
    mobile mixtures of E2B and E4B), evaluated against its own BF16."""

    name: str = Field(pattern=r"^[\w.-]+$")  # "mobile": the checkpoint is called <model>-<name>
    source: str
    base_model: str | None = None
    recipes: tuple[str, ...] = Field(min_length=1)  # evaluated
    publish_recipes: tuple[str, ...] | None = None  # None: every recipe that passes

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _check_source(v)


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    source: str
    repo: str
    file_prefix: str = Field(pattern=r"^[\w.-]+$")
    base_model: str | None = None  # the Hub id of the QAT checkpoint, for the card
    recipes: tuple[str, ...] | None = None  # evaluated (None: the release's)
    publish_recipes: tuple[str, ...] | None = None  # published if they pass (None: the release's)
    gate: GateConfig | None = None
    variants: tuple[VariantConfig, ...] = ()

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _check_source(v)

    @model_validator(mode="after")
    def _variants(self) -> ModelConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name}: variant names must be unique; got {names}")
        return self

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not _REPO_RE.match(v):
            raise ValueError(f"repo {v!r} must look like 'org/name'")
        return v


class ReleaseConfig(_Strict):
    version: Literal[1]
    family: str
    license: str = "gemma"
    quantized_by: str = "qatgguf"
    recipes: tuple[str, ...] = ("q8_0", "q4_0")  # evaluated for every model
    # Which evaluated recipes are published when they pass (None: all); the others are
    # evaluated for the comparison only.
    publish_recipes: tuple[str, ...] | None = None
    # The naive baseline (llama-quantize's choices): a published file other than it must
    # have a lower mean KLD and be no larger; the cards compare against it.
    naive_recipe: str | None = "q4_0"
    base_recipe: str = "bf16"
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    gate: GateConfig = GateConfig()
    eval: EvalConfig = EvalConfig()
    store: StoreConfig = StoreConfig()
    publish: PublishConfig = PublishConfig()
    sources: SourcesConfig = SourcesConfig()
    ray: RayConfig = RayConfig()
    retention: int = Field(5, ge=1)  # `qatgguf gc` keeps what the last N releases used

    @model_validator(mode="after")
    def _unique(self) -> ReleaseConfig:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        from qatgguf.recipes import available_recipes

        known = set(available_recipes())
        wanted = {self.base_recipe, *self.recipes, *(self.publish_recipes or ())}
        for m in self.models:
            wanted |= {*(m.recipes or ()), *(m.publish_recipes or ())}
            for v in m.variants:
                wanted |= {*v.recipes, *(v.publish_recipes or ())}
        if self.naive_recipe:
            wanted.add(self.naive_recipe)
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"unknown recipe(s) {unknown}; known: {sorted(known)}")
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"model {name!r} is not in family {self.family!r}; known: {[m.name for m in self.models]}")

    def recipes_for(self, model: ModelConfig) -> tuple[str, ...]:
        return model.recipes if model.recipes is not None else self.recipes

    def publish_for(self, model: ModelConfig) -> tuple[str, ...]:
        """The recipes of `model` that publish when they pass their gate."""
        chosen = model.publish_recipes if model.publish_recipes is not None else self.publish_recipes
        recipes = self.recipes_for(model)
        return tuple(r for r in recipes if chosen is None or r in chosen)

    def checkpoints(self, model: ModelConfig) -> tuple[ModelConfig, ...]:
        """The model's checkpoints as models of their own: the model, then each variant
        (`<model>-<variant>`, the same repo and file prefix, its own source and recipes)."""
        out = [model.model_copy(update={"variants": ()})]
        for v in model.variants:
            out.append(model.model_copy(update={
                "name": f"{model.name}-{v.name}", "source": v.source, "base_model": v.base_model or model.base_model,
                "recipes": v.recipes, "publish_recipes": v.publish_recipes if v.publish_recipes is not None
                else v.recipes, "variants": ()}))
        return tuple(out)

    def gate_for(self, model: ModelConfig) -> GateConfig:
        return model.gate if model.gate is not None else self.gate

    def resolved(self, base_dir: str | Path) -> ReleaseConfig:
        """The same release with every local path (store, Hub folder, corpus, model
        sources) made absolute against `base_dir`, so workers in other directories agree."""

        def local(p: str | None) -> str | None:
            if p is None or "://" in p:
                return p
            return str((Path(base_dir) / Path(p).expanduser()).resolve())

        return self.model_copy(
            update={
                "store": self.store.model_copy(update={"url": local(self.store.url)}),
                "publish": self.publish.model_copy(update={"local_root": local(self.publish.local_root)}),
                "eval": self.eval.model_copy(update={"corpus": local(self.eval.corpus)}),
                "models": tuple(m.model_copy(update={
                    "source": local(m.source),
                    "variants": tuple(v.model_copy(update={"source": local(v.source)}) for v in m.variants)})
                    for m in self.models),
            }
        )

    def select(self, *, models: list[str] | None = None, recipes: list[str] | None = None) -> ReleaseConfig:
        """The same release restricted to some models and/or recipes."""
        update: dict = {}
        if models:
            update["models"] = tuple(self.model(n) for n in models)
        if recipes:
            # the chosen recipes for every checkpoint, each published when it passes
            update["recipes"] = tuple(recipes)
            update["publish_recipes"] = None
            update["models"] = tuple(
                m.model_copy(update={"recipes": None, "publish_recipes": None, "variants": tuple(
                    v.model_copy(update={"recipes": tuple(recipes), "publish_recipes": None}) for v in m.variants)})
                for m in update.get("models", self.models))
        return self.model_copy(update=update)


def load_release_config(path: str | Path) -> ReleaseConfig:
    """Read and validate a release config. Raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: release config not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_release_config(raw, origin=str(path))


def parse_release_config(raw: object, *, origin: str = "<config>") -> ReleaseConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a release config is a mapping, got {type(raw).__name__}")
    if raw.get("version") != CONFIG_VERSION:
        raise ConfigError(f"{origin}: 'version' must be {CONFIG_VERSION} (got {raw.get('version')!r})")
    try:
        return ReleaseConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{origin}: invalid release config:\n" + "\n".join(lines)) from None


def builtin_config_path(name: str) -> Path:
    """Configs shipped with qatgguf (`tiny-family`, `gemma-4-qat`)."""
    p = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"no built-in release config {name!r}")
    return p
