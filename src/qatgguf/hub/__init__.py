"""Model cards and publishing: `render_card(CardData) -> str`, the repo manifest that says
which files the pipeline owns (`qatgguf.hub.manifest`), and two publishers behind one
protocol, `LocalHubPublisher` (a folder laid out as the Hub repo) and `HubPublisher` (the
Hub itself). Only `qatgguf.hub.publisher` imports `HfApi`; it loads on first use of
`HubPublisher`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatgguf.hub.base import (
    CollectionRef,
    HubLimits,
    Publisher,
    PublishResult,
    RetryPolicy,
    plan_files,
)
from qatgguf.hub.card import (
    CardData,
    CardFile,
    CardPlot,
    EvalMethod,
    RunInfo,
    Sampling,
    check_card,
    render_card,
)
from qatgguf.evaluate.tables import EvalTable
from qatgguf.hub.facts import ModelFacts, read_model_facts
from qatgguf.hub.local import LocalHubPublisher
from qatgguf.hub.manifest import (
    MANIFEST_PATH,
    Manifest,
    ManifestEntry,
    ReleaseFile,
    ReleaseUpload,
)

if TYPE_CHECKING:
    from qatgguf.hub.publisher import HubPublisher

__all__ = [
    "MANIFEST_PATH",
    "CardData",
    "CardFile",
    "CardPlot",
    "CollectionRef",
    "EvalMethod",
    "EvalTable",
    "HubLimits",
    "HubPublisher",
    "LocalHubPublisher",
    "Manifest",
    "ManifestEntry",
    "ModelFacts",
    "PublishResult",
    "Publisher",
    "ReleaseFile",
    "ReleaseUpload",
    "RetryPolicy",
    "RunInfo",
    "Sampling",
    "check_card",
    "open_publisher",
    "plan_files",
    "read_model_facts",
    "render_card",
]


def __getattr__(name: str) -> object:
    if name == "HubPublisher":
        from qatgguf.hub.publisher import HubPublisher

        return HubPublisher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_publisher(
    settings: Any, *, token: str | None = None, retry: RetryPolicy | None = None
) -> Publisher:
    """The publisher a release config asks for.

    `settings` is any object with `target` ("local" or "hub"), `local_root` (for local)
    and `endpoint` (for hub, None means huggingface.co), and optionally `private`; the
    release config's `publish` section is one. Raises PublishError for another target,
    or for a token that would travel in clear text (see `HubPublisher`).
    """
    from qatgguf.errors import PublishError

    target = getattr(settings, "target", None)
    if target == "local":
        return LocalHubPublisher(settings.local_root)
    if target == "hub":
        from qatgguf.hub.publisher import HubPublisher

        return HubPublisher(
            endpoint=getattr(settings, "endpoint", None),
            token=token,
            private=bool(getattr(settings, "private", False)),
            retry=retry,
        )
    raise PublishError(f"publish target {target!r} is not known; use 'local' or 'hub'")
