"""Model cards and publishing: `render_card(CardData) -> str`, and two publishers behind one
protocol, `LocalHubPublisher` (a folder laid out as the Hub repo) and `HubPublisher` (the
Hub itself). Only `qatgguf.hub.publisher` imports `HfApi`; it loads on first use of
`HubPublisher`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatgguf.hub.base import HubLimits, Publisher, PublishResult, plan_files
from qatgguf.hub.card import (
    CardData,
    CardFile,
    EvalRow,
    UsageCommand,
    check_card,
    default_usage,
    render_card,
)
from qatgguf.hub.local import LocalHubPublisher

if TYPE_CHECKING:
    from qatgguf.hub.publisher import HubPublisher

__all__ = [
    "CardData",
    "CardFile",
    "EvalRow",
    "HubLimits",
    "HubPublisher",
    "LocalHubPublisher",
    "PublishResult",
    "Publisher",
    "UsageCommand",
    "check_card",
    "default_usage",
    "open_publisher",
    "plan_files",
    "render_card",
]


def __getattr__(name: str) -> object:
    if name == "HubPublisher":
        from qatgguf.hub.publisher import HubPublisher

        return HubPublisher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_publisher(settings: Any, *, token: str | None = None) -> Publisher:
    """The publisher a release config asks for.

    `settings` is any object with `target` ("local" or "hub"), `local_root` (for local)
    and `endpoint` (for hub, None means huggingface.co), and optionally `private`; the
    release config's `publish` section is one. Raises PublishError for another target.
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
        )
    raise PublishError(f"publish target {target!r} is not known; use 'local' or 'hub'")
