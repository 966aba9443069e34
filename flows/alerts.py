"""Install the alerts of `infra/automations.yaml` on the Prefect server: an automation that
notifies when a release or nightly run fails or crashes.

    QATGGUF_ALERT_WEBHOOK=https://hooks.example/... python -m qatgguf.flows.alerts [--webhook URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import yaml

AUTOMATIONS = Path(__file__).resolve().parents[1] / "infra" / "automations.yaml"


def _notification_block(name: str, webhook: str | None) -> Any:
    """The id of notification block `name`, created as a webhook block when missing."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    try:
        block = CustomWebhookNotificationBlock.load(name)
        if webhook and block.url != webhook:
            block.url = webhook
            return block.save(name, overwrite=True)
        return block._block_document_id
    except ValueError:
        if not webhook:
            raise SystemExit(f"notification block {name!r} does not exist: pass --webhook URL "
                             "(or set QATGGUF_ALERT_WEBHOOK) to create it") from None
    block = CustomWebhookNotificationBlock(name=name, url=webhook, json_data={"text": "{{subject}}\n{{body}}"})
    return block.save(name, overwrite=True)


def install_alerts(*, webhook: str | None = None, path: Path = AUTOMATIONS) -> list[Any]:
    """Create (or replace, by name) every automation in `path`; returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    specs = yaml.safe_load(path.read_text())["automations"]
    automations = []
    for spec in specs:
        actions = []
        for action in spec["actions"]:
            action = dict(action)
            if "block" in action:
                action["block_document_id"] = str(_notification_block(action.pop("block"), webhook))
            actions.append(action)
        automations.append(AutomationCore.model_validate({**spec, "actions": actions}))

    async def apply() -> list[Any]:
        ids = []
        async with get_client() as client:
            for a in automations:
                for old in await client.read_automations_by_name(a.name):
                    await client.delete_automation(old.id)
                ids.append(await client.create_automation(a))
        return ids

    return asyncio.run(apply())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--webhook", default=os.environ.get("QATGGUF_ALERT_WEBHOOK"),
                    help="URL the notification block posts to (default: $QATGGUF_ALERT_WEBHOOK)")
    args = ap.parse_args()
    for automation_id in install_alerts(webhook=args.webhook):
        print(f"automation {automation_id} installed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
