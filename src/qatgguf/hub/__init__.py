"""Model cards and publishing: `render_card(CardData) -> str`, and two publishers behind one
protocol, `LocalHubPublisher` (a folder laid out as the Hub repo) and `HubPublisher` (the
Hub itself). Only `qatgguf.hub.publisher` imports `HfApi`; it loads on first use of
`HubPublisher`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    "plan_files",
    "render_card",
]


def __getattr__(name: str) -> object:
    if name == "HubPublisher":
        from qatgguf.hub.publisher import HubPublisher

        return HubPublisher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
