"""Operator views: `poller check` (is a poller alive?) and `poller status` (what is it doing?)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError
from rich.console import Console
from rich.table import Table

from poller.settings import Settings
from poller.store import Store


def check(settings: Settings, instance: str | None = None) -> int:
    """0 when a live heartbeat exists (of `instance`, when given), else 1; one line says why."""
    now = datetime.now(UTC)
    try:
        store = Store.connect(settings)  # a mongodb+srv:// name is resolved here
        try:
            live = store.heartbeats.live(now, instance)
        finally:
            store.close()
    except PyMongoError as exc:
        _line(f"poller check: MongoDB is unavailable: {_one_line(exc)}")
        return 1
    who = f"poller '{instance}'" if instance else "a poller"
    if not live:
        _line(f"poller check: no live heartbeat from {who}")
        return 1
    stuck = [beat for beat in live if beat.get("ticking") is False]
    if len(stuck) == len(live):
        _line(f"poller check: {stuck[0]['_id']} is alive but its ticks stopped completing")
        return 1
    newest = next(beat for beat in live if beat not in stuck)
    seen = (now - newest["lastSeenAt"]).total_seconds()
    _line(f"ok: {len(live)} live, {newest['_id']} on {newest.get('host')} seen {seen:.0f} s ago")
    return 0


def status(settings: Settings, as_json: bool = False) -> int:
    """Print live pollers, the backlog, the last 24 hours and running campaigns."""
    now = datetime.now(UTC)
    try:
        store = Store.connect(settings)
        try:
            overview = _overview(store, now)
        finally:
            store.close()
    except PyMongoError as exc:
        _line(f"poller status: MongoDB is unavailable: {_one_line(exc)}")
        return 1
    if as_json:
        sys.stdout.write(json.dumps(overview, default=str, indent=2) + "\n")
    else:
        _render(overview, now)
    return 0


def _overview(store: Store, now: datetime) -> dict[str, Any]:
    """Live pollers, the message backlog, the last 24 hours' outcomes, running campaigns."""
    return {
        "instances": store.heartbeats.live(now),
        "messages": {
            "dueNow": store.messages.count_due(now),
            "inProgress": store.messages.in_progress(),
            "scheduledLater": store.messages.scheduled_later(now),
        },
        "last24h": store.messages.outcomes_since(now - timedelta(hours=24)),
        "campaigns": store.campaigns.running(),
    }


def _render(overview: dict[str, Any], now: datetime) -> None:
    console = Console()
    pollers = Table(title="Pollers (live)", title_justify="left")
    for column in ("instance", "host", "pid", "version", "seen", "last tick", "WAHA sessions"):
        pollers.add_column(column)
    for beat in overview["instances"]:
        last = beat.get("lastTick") or {}
        sessions = beat.get("wahaSessions")
        pollers.add_row(
            str(beat["_id"]),
            str(beat.get("host")),
            str(beat.get("pid")),
            str(beat.get("version")),
            f"{(now - beat['lastSeenAt']).total_seconds():.0f} s ago",
            f"sent {last.get('sent', 0)}, failed {last.get('failed', 0)}" if last else "-",
            "unreachable"
            if sessions is None
            else ", ".join(f"{s['name']}: {s['status']}" for s in sessions) or "none",
        )
    if not overview["instances"]:
        pollers.add_row("[red]none: nothing is sending[/red]", "", "", "", "", "", "")
    console.print(pollers)

    messages = Table(title="Messages", title_justify="left")
    counts = {**overview["messages"], **overview["last24h"]}
    labels = {
        "dueNow": "due now",
        "inProgress": "being sent",
        "scheduledLater": "scheduled later",
        "sent": "sent (24 h)",
        "failed": "failed (24 h)",
        "expired": "expired (24 h)",
        "unknown": "unknown (24 h)",
        "cancelled": "cancelled (24 h)",
    }
    for label in labels.values():
        messages.add_column(label, justify="right")
    messages.add_row(*(str(counts.get(key, 0)) for key in labels))
    console.print(messages)

    campaigns = Table(title="Running campaigns", title_justify="left")
    for column in ("campaign", "status", "sent", "failed", "expired", "total", "progress"):
        campaigns.add_column(column)
    for campaign in overview["campaigns"]:
        stats = campaign.get("stats") or {}
        total = stats.get("total") or 0
        done = sum(stats.get(k, 0) for k in ("sent", "failed", "expired"))
        campaigns.add_row(
            str(campaign.get("name") or campaign["_id"]),
            str(campaign.get("status") or "-"),
            *(str(stats.get(k, 0)) for k in ("sent", "failed", "expired")),
            str(total),
            f"{100 * done / total:.0f}%" if total else "-",
        )
    if not overview["campaigns"]:
        campaigns.add_row("none", "", "", "", "", "", "")
    console.print(campaigns)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
