"""`syncd subscriptions`: MasonHub's callback registrations kept in step with the config.

syncd owns the registrations whose URL is under ``{webhooks.public_url}{webhooks.path}/``:
``sync`` registers the missing ones (one URL per message type, with the callback token when
one is configured) and removes owned ones for types no longer subscribed. Registrations
pointing anywhere else are someone else's and are never touched.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from syncd.config import Settings
from syncd.errors import ConfigError
from syncd.masonhub import MasonHubClient


@dataclass(frozen=True)
class Plan:
    """What `subscriptions sync` would change."""

    register: list[dict[str, Any]] = field(default_factory=list)
    remove: list[Mapping[str, Any]] = field(default_factory=list)
    keep: list[Mapping[str, Any]] = field(default_factory=list)


def callback_base(settings: Settings) -> str:
    """The URL prefix of syncd's own callbacks."""
    public = settings.webhooks.public_url.rstrip("/")
    if not public:
        raise ConfigError("webhooks.public_url", "set it to the base URL MasonHub should call")
    return f"{public}{settings.webhooks.path}/"


def plan(settings: Settings, registered: Sequence[Mapping[str, Any]]) -> Plan:
    """Compare MasonHub's registrations with the config's subscriptions."""
    base = callback_base(settings)
    wanted = {mt: base + mt for mt in settings.webhooks.subscriptions}
    token = settings.webhooks.callback_token.get_secret_value()
    result = Plan()
    present = set()
    for callback in registered:
        url, message_type = str(callback.get("url", "")), callback.get("message_type")
        if not url.startswith(base):
            continue
        if wanted.get(str(message_type)) == url and str(message_type) not in present:
            present.add(str(message_type))
            result.keep.append(callback)
        else:
            result.remove.append(callback)
    for message_type, url in wanted.items():
        if message_type not in present:
            entry: dict[str, Any] = {"url": url, "message_type": message_type, "api_version": "2.0"}
            if token:
                entry["token"] = token
            result.register.append(entry)
    return result


async def list_subscriptions(
    settings: Settings, client: MasonHubClient, out: TextIO = sys.stdout
) -> int:
    """Print MasonHub's callbacks beside the config's subscriptions."""
    registered = await client.callbacks()
    base = settings.webhooks.public_url and callback_base(settings)
    out.write(f"{'MESSAGE TYPE':24}  {'OWNER':6}  {'WANTED':6}  URL\n")
    wanted = set(settings.webhooks.subscriptions)
    seen = set()
    for callback in sorted(registered, key=lambda c: str(c.get("message_type"))):
        message_type = str(callback.get("message_type"))
        owner = "syncd" if base and str(callback.get("url", "")).startswith(base) else "other"
        seen.add(message_type)
        out.write(
            f"{message_type:24}  {owner:6}  {'yes' if message_type in wanted else 'no':6}  "
            f"{callback.get('url')}\n"
        )
    for message_type in sorted(wanted - seen):
        out.write(f"{message_type:24}  {'-':6}  {'yes':6}  (not registered)\n")
    return 0


async def sync_subscriptions(
    settings: Settings, client: MasonHubClient, *, dry_run: bool, out: TextIO = sys.stdout
) -> int:
    """Register missing callbacks and remove syncd's unwanted ones (or print the plan)."""
    changes = plan(settings, await client.callbacks())
    for entry in changes.register:
        out.write(f"register  {entry['message_type']:24}  {entry['url']}\n")
    for callback in changes.remove:
        out.write(f"remove    {callback.get('message_type')!s:24}  {callback.get('url')}\n")
    if not changes.register and not changes.remove:
        out.write("subscriptions are in step with the config\n")
        return 0
    if dry_run:
        out.write("dry run: nothing changed\n")
        return 0
    if changes.register:
        await client.register_callbacks(changes.register)
    ids = [str(c["id"]) for c in changes.remove if c.get("id")]
    if ids:
        await client.delete_callbacks(ids)
    out.write(f"registered {len(changes.register)}, removed {len(ids)}\n")
    return 0
