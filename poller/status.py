"""Operator views: `poller check` (is a poller alive?) and `poller status` (what is it doing?)."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError
from rich.console import Console
from rich.table import Table

from poller import mongo_errors, refusals
from poller.context import session_cap
from poller.pacing import Pacing
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
        _line(f"poller check: MongoDB is unavailable: {_mongo(exc, settings)}")
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
    for server in newest.get("wahaServers") or []:
        _line(f"  WAHA server {server['name']} at {server['url']}: {describe(server)}")
    refused = refusals.describe(refused_posts(live))
    if refused:
        _line(f"  warning: {refused}")
    return 0


def refused_posts(instances: list[dict[str, Any]]) -> dict[str, int]:
    """WAHA's event posts the live pollers refused in the last hour, by reason."""
    total: Counter[str] = Counter()
    for beat in instances:
        total.update(beat.get("eventsRefused") or {})
    return dict(total)


def describe(server: dict[str, Any]) -> str:
    """A WAHA server as a heartbeat has it, in one line: reachable or not, the key, the breaker,
    its sessions."""
    if server.get("reachable") is None:
        state = "not asked yet"
    elif server["keyAccepted"] is False:
        state = "reachable, API key refused"
    elif server["reachable"]:
        state = "reachable, key accepted" if server["keyAccepted"] else "reachable"
    else:
        state = "unreachable"
    state += f", breaker {server['breaker']}"
    if server.get("problem"):
        state += f" ({server['problem']})"
    sessions = server.get("sessions")
    if sessions is not None:
        listed = ", ".join(f"{s['name']} {s['status']}" for s in sessions) or "none"
        state += f"; sessions: {listed}"
    return state


def status(settings: Settings, as_json: bool = False) -> int:
    """Print live pollers, the backlog, the last 24 hours, running campaigns and recurring
    schedules."""
    now = datetime.now(UTC)
    try:
        store = Store.connect(settings)
        try:
            overview = build(store, now, Pacing.from_settings(settings))
        finally:
            store.close()
    except PyMongoError as exc:
        _line(f"poller status: MongoDB is unavailable: {_mongo(exc, settings)}")
        return 1
    if as_json:
        sys.stdout.write(to_json(overview, indent=2) + "\n")
    else:
        _render(overview, now)
    return 0


def to_json(overview: dict[str, Any], indent: int | None = None) -> str:
    """The overview as JSON: dates as ISO 8601 in UTC, ids as text."""
    return json.dumps(overview, default=_json, indent=indent)


def build(store: Store, now: datetime, pacing: Pacing) -> dict[str, Any]:
    """Live pollers, the message backlog, each WhatsApp session's lane, the last 24 hours'
    outcomes, running campaigns, active recurring schedules."""
    instances = store.heartbeats.live(now)
    refused = refused_posts(instances)
    return {
        "instances": instances,
        # The WAHA servers as the most recently seen poller found them, each with its `state`
        # in words (`describe`).
        "servers": [
            {**server, "state": describe(server)}
            for server in next((b["wahaServers"] for b in instances if b.get("wahaServers")), [])
        ],
        "sessions": _sessions(store, now, pacing),
        # WAHA's event posts refused in the last hour by reason, and that in words (or None).
        "eventsRefused": refused,
        "eventsRefusedText": refusals.describe(refused),
        "messages": {
            "dueNow": store.plans.count_due(now),
            "inProgress": store.plans.in_progress(),
            "scheduledLater": store.plans.later(now),
        },
        "last24h": {
            **store.plans.outcomes_since(now - timedelta(hours=24)),
            **store.plans.receipts_since(now - timedelta(hours=24)),
            "optedOut": store.optouts.since(now - timedelta(hours=24)),
        },
        "optouts": store.optouts.latest(),
        "campaigns": store.campaigns.running(),
        "schedules": _schedules(store, pacing),
    }


def _schedules(store: Store, pacing: Pacing) -> list[dict[str, Any]]:
    """Active recurring schedules, the next to occur first (those with none last)."""
    rows = [
        {
            "name": d.get("name"),
            "cron": d.get("cron"),
            "timezone": d.get("timezone") or pacing.zone.key,
            "nextOccurrenceAt": d.get("nextOccurrenceAt"),
            "lastError": d.get("lastError"),
        }
        for d in store.definitions.listing()
    ]
    never = datetime.max.replace(tzinfo=UTC)
    return sorted(rows, key=lambda row: row["nextOccurrenceAt"] or never)


def _sessions(store: Store, now: datetime, pacing: Pacing) -> list[dict[str, Any]]:
    """Per WhatsApp session: how many messages wait, the next planned send, today's sends
    against the daily cap, and why it is not sending when it is not."""
    caps = store.sessions.daily_caps()
    today = pacing.day(now).isoformat()
    rows = []
    plans = store.plans.lanes(store.campaigns.flags().held)
    for name, lane in sorted(store.turns.lanes().items()):
        cap = session_cap(caps, name, pacing.daily_cap, store.sessions.collection.name)
        sent_today = int(lane.get("count") or 0) if lane.get("day") == today else 0
        waiting, next_at, paused = plans.get(name, (0, None, 0))
        if not (waiting or sent_today or lane.get("blocked") or isinstance(cap, str)):
            continue  # a session with nothing to show
        quiet = pacing.quiet_until(now)
        why = lane.get("blocked") or (cap if isinstance(cap, str) else None)
        if why is None and quiet is not None and waiting:
            why = f"quiet hours ({pacing.describe_quiet()}) until {quiet.isoformat()}"
        elif why is None and isinstance(cap, int) and sent_today >= cap and waiting:
            why = f"daily cap of {cap} reached"
        elif why is None and waiting and paused == waiting:
            why = "its campaigns are paused"
        rows.append(
            {
                "session": name or "(none)",
                "waiting": waiting,  # paused ones included
                "paused": paused,  # of a paused campaign: not in nextPlannedAt
                "nextPlannedAt": next_at,
                "sentToday": sent_today,
                "dailyCap": None if isinstance(cap, str) else cap,
                "notSending": why,
            }
        )
    return rows


def _render(overview: dict[str, Any], now: datetime) -> None:
    """The overview as tables that read well at 80 columns: headers never cut, long cells
    folded onto more lines."""
    console = Console()
    pollers = _table("Pollers (live)", "poller", "version", "seen", "last tick", "WAHA sessions")
    for beat in overview["instances"]:
        last = beat.get("lastTick") or {}
        sessions = beat.get("wahaSessions")
        pollers.add_row(
            f"{beat['_id']} on {beat.get('host')}",
            str(beat.get("version")),
            f"{(now - beat['lastSeenAt']).total_seconds():.0f} s ago",
            f"sent {last.get('sent', 0)}, failed {last.get('failed', 0)}" if last else "-",
            "unreachable"
            if sessions is None
            else ", ".join(f"{s['name']}: {s['status']}" for s in sessions) or "none",
        )
    if not overview["instances"]:
        pollers.add_row("[red]none: nothing is sending[/red]", "", "", "", "")
    console.print(pollers)
    if overview["eventsRefusedText"]:
        console.print(f"[red]{overview['eventsRefusedText']}[/red]")

    if overview["servers"]:
        servers = _table("WAHA servers", "server", "url", "state")
        for server in overview["servers"]:
            servers.add_row(server["name"], server["url"], server["state"])
        console.print(servers)

    sessions = _table(
        "WhatsApp sessions", "session", "waiting", "next send", "today", "not sending because"
    )
    for row in overview["sessions"]:
        cap = row["dailyCap"]
        sessions.add_row(
            row["session"],
            f"{row['waiting']} ({row['paused']} paused)" if row["paused"] else str(row["waiting"]),
            when(row["nextPlannedAt"], now),
            f"{row['sentToday']} of {cap}" if cap is not None else str(row["sentToday"]),
            row["notSending"] or "-",
        )
    if not overview["sessions"]:
        sessions.add_row("none", "", "", "", "")
    console.print(sessions)

    counts = {**overview["messages"], **overview["last24h"]}
    console.print("[italic]Messages[/italic]")
    for label, keys in MESSAGE_LINES:
        listed = ", ".join(f"{counts.get(key, 0)} {name}" for key, name in keys)
        console.print(f"  {label}: {listed}")

    campaigns = _table("Running campaigns", "campaign", "status", "sent", "failed", "of", "eta")
    for campaign in overview["campaigns"]:
        stats = campaign.get("stats") or {}
        total = stats.get("total") or 0
        done = sum(stats.get(k, 0) for k in ("sent", "failed", "expired"))
        progress = f" ({100 * done / total:.0f}%)" if total else ""
        campaigns.add_row(
            str(campaign.get("name") or campaign["_id"]),
            str(campaign.get("status") or "-"),
            str(stats.get("sent", 0)),
            str(stats.get("failed", 0) + stats.get("expired", 0)),
            f"{total}{progress}",
            when(campaign.get("eta"), now),
        )
    if not overview["campaigns"]:
        campaigns.add_row("none", "", "", "", "", "")
    console.print(campaigns)

    if overview["optouts"]:
        optouts = _table("Latest opt-outs", "session", "chat", "since")
        for row in overview["optouts"]:
            optouts.add_row(
                str(row.get("session")), str(row.get("chatId")), when(row.get("at"), now)
            )
        console.print(optouts)

    schedules = _table("Recurring schedules", "schedule", "cron", "zone", "next", "problem")
    for row in overview["schedules"]:
        schedules.add_row(
            str(row["name"]),
            str(row["cron"]),
            str(row["timezone"]),
            when(row["nextOccurrenceAt"], now),
            row["lastError"] or "-",
        )
    if not overview["schedules"]:
        schedules.add_row("none", "", "", "", "")
    console.print(schedules)


# The Messages lines of `poller status`: (label, ((count key, what it counts), ...)).
MESSAGE_LINES = (
    ("now", (("dueNow", "due"), ("inProgress", "being sent"), ("scheduledLater", "later"))),
    (
        "last 24 h",
        (
            ("sent", "sent"),
            ("failed", "failed"),
            ("expired", "expired"),
            ("unknown", "unknown"),
            ("cancelled", "cancelled"),
        ),
    ),
    ("receipts, 24 h", (("delivered", "delivered"), ("read", "read"), ("optedOut", "opted out"))),
)


def _table(title: str, *columns: str) -> Table:
    """A table whose headers are never cut (each column at least as wide as its header) and
    whose cells fold onto more lines when the terminal is narrow."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, min_width=len(column), overflow="fold")
    return table


def when(at: Any, now: datetime) -> str:
    """A time as an operator reads it: UTC, and how far from now."""
    if not isinstance(at, datetime):
        return "-"
    ahead = (at - now).total_seconds()
    rel = f"in {_span(ahead)}" if ahead >= 0 else f"{_span(-ahead)} ago"
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({rel})"


def _span(seconds: float) -> str:
    """A span in whole units, rounded down, as the dashboard writes it: seconds under 2
    minutes, minutes under 2 hours, hours under 2 days, then days."""
    for unit, size, below in (("s", 1, 120), ("min", 60, 7200), ("h", 3600, 172800)):
        if seconds < below:
            return f"{math.floor(seconds / size)} {unit}"
    return f"{math.floor(seconds / 86400)} days"


def _json(value: Any) -> Any:
    """Dates as ISO 8601 in UTC; anything else json cannot write (ids) as text."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def _mongo(exc: PyMongoError, settings: Settings) -> str:
    return mongo_errors.describe(exc, settings.mongodb_timeout_seconds)


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")
