"""The small values release steps pass to each other (and across task boundaries): references
to stored plans, parts, files, records and evaluation ranges, and each model's plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from qatgguf.convert.source import SourceRef
from qatgguf.resources import StepStats
from qatgguf.store import ArtifactRef


@dataclass(frozen=True)
class PlanRef:
    recipe: str
    key: str
    ref: ArtifactRef


@dataclass(frozen=True)
class ShardInfo:
    index: int
    file: str | None
    size: int
    digest: str
    largest: int  # bytes of the largest source tensor (decides the row-block buffers)
    part_bytes: int  # bytes of the parts of every recipe


def load_plan(store, ref: ArtifactRef):
    from qatgguf.convert import ConversionPlan

    return ConversionPlan.from_json(store.get_bytes(ref.uri).decode())


def load_mmproj_plan(store, ref: ArtifactRef):
    from qatgguf.convert.mmproj import MmprojPlan

    return MmprojPlan.from_json(store.get_bytes(ref.uri).decode())


@dataclass(frozen=True)
class PartRef:
    key: str
    ref: ArtifactRef


@dataclass(frozen=True)
class ShardResult:
    index: int
    parts: dict[str, PartRef]  # recipe -> part
    stats: StepStats = field(compare=False)


@dataclass(frozen=True)
class GGUFOutput:
    """A GGUF file (or its split files) in the store."""

    recipe: str
    key: str
    files: tuple[ArtifactRef, ...]
    eval_digest: str  # tensor bytes and the metadata that can change logits or tokens
    types: dict[str, int] = field(default_factory=dict)  # tensors per GGML type
    stats: StepStats = field(compare=False, default_factory=StepStats)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def sha256(self) -> str:
        return self.files[0].sha256


@dataclass(frozen=True)
class ModelPlan:
    model: str
    source: SourceRef
    plan_refs: dict[str, PlanRef]  # recipe -> the stored plan (its key and store reference)
    shards: tuple[ShardInfo, ...]
    mmproj: PlanRef | None
    gguf_bytes: dict[str, int]  # recipe -> tensor bytes of its file
    n_vocab: int
    # outputs already in the store, found by their content keys: the flow does not submit
    # the tasks that would make them
    parts_done: dict[int, dict[str, PartRef]] = field(default_factory=dict)  # shards with every part
    gguf_done: dict[str, GGUFOutput] = field(default_factory=dict)
    mmproj_done: GGUFOutput | None = None
    eval_done: dict[str, dict] = field(default_factory=dict)  # recipe -> merged evaluation
    stats: StepStats = field(default_factory=StepStats, compare=False)

    @property
    def n_shards(self) -> int:
        return len(self.shards)


@dataclass(frozen=True)
class BaseRecordsRef:
    key: str
    records: ArtifactRef
    n_chunks: int
    n_seq: int
    stats: StepStats = field(compare=False, default_factory=StepStats)


@dataclass(frozen=True)
class RangeOutput:
    key: str
    ref: ArtifactRef | None  # None: fewer ranges than parts
    stats: StepStats = field(compare=False, default_factory=StepStats)
