"""What a tick and a status picture cost MongoDB, whatever the size of the data: the commands of
an idle tick with 0 and with 200 lane documents, and the documents a tick in the middle of a
paced campaign and `/api/status` examine, with a campaign of 1,000 and of 5,000 messages.

    .venv/bin/python benchmarks/core.py

Each read command a tick or a status picture sends is recorded (pymongo command monitoring) and
explained afterwards (`executionStats.totalDocsExamined`). Runs on an embedded SecantusDB, or
MONGODB_TEST_URI; the WAHA simulator answers at once. The campaign is written as the poller
leaves it once planned (4 sessions, a message every 15 s each), so that the figure is one tick's,
not the planning's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import MongoClient, monitoring

from poller import status
from poller.context import Memory
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import embedded_mongodb
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient

SESSIONS = ["s1", "s2", "s3", "s4"]
READS = ("find", "aggregate", "count")


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.started_: list[tuple[str, str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = {k: v for k, v in event.command.items() if not k.startswith("$") and k != "lsid"}
        self.started_.append((event.command_name, event.database_name, command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> list[tuple[str, str, dict[str, Any]]]:
        taken, self.started_ = self.started_, []
        return taken


def examined(client: MongoClient[dict[str, Any]], commands: list[Any]) -> int:
    """Documents the read commands among `commands` examine, as MongoDB explains them."""
    total = 0
    for name, db, command in commands:
        if name not in READS or command.get(name) == "system.profile":
            continue
        plan = client[db].command({"explain": command, "verbosity": "executionStats"})
        stats = plan.get("executionStats") or _stage_stats(plan)
        total += int(stats.get("totalDocsExamined", 0))
    return total


def _stage_stats(plan: dict[str, Any]) -> dict[str, Any]:
    """An aggregate's executionStats, from the first stage that has them."""
    for stage in plan.get("stages", []):
        cursor = stage.get("$cursor", {})
        if "executionStats" in cursor:
            stats: dict[str, Any] = cursor["executionStats"]
            return stats
    return {}


@contextmanager
def setup(uri: str, db: str) -> Iterator[tuple[Store, Commands, WahaClient, Settings]]:
    settings = Settings(
        mongodb_uri=uri, mongodb_db=db, waha_url="", waha_api_key="bench-key-0123456789"
    )
    with WahaSimulator(
        api_key=settings.waha_api_key, sessions=dict.fromkeys(SESSIONS, "WORKING")
    ) as waha:
        settings = Settings(**{**settings.__dict__, "waha_url": waha.url})
        commands = Commands()
        client: MongoClient[dict[str, Any]] = MongoClient(
            uri, tz_aware=True, event_listeners=[commands]
        )
        client.drop_database(db)
        store = Store(client, settings)
        store.ensure_indexes()
        wa = WahaClient(waha.url, settings.waha_api_key, 10)
        try:
            yield store, commands, wa, settings
        finally:
            wa.close()
            client.drop_database(db)
            client.close()


def idle_commands(uri: str, lanes: int) -> int:
    with setup(uri, f"bench_idle_{lanes}") as (store, commands, waha, settings):
        if lanes:
            store.turns.collection.insert_many([{"_id": f"session-{n}"} for n in range(lanes)])
        now, memory = datetime.now(UTC), Memory()
        pacing = Pacing.from_settings(settings)  # the defaults: paced 10-25 s
        tick(store, waha, 20, now=now, pacing=pacing, memory=memory)
        commands.take()
        later = now + store.timings.tick_interval
        tick(store, waha, 20, now=later, pacing=pacing, memory=memory)
        return len(commands.take())


def campaign_costs(uri: str, size: int) -> tuple[int, int]:
    """Documents examined by a tick in the middle of a campaign of `size`, and by a status
    picture (the dashboard's, with its list of messages not sent)."""
    with setup(uri, f"bench_campaign_{size}") as (store, commands, waha, settings):
        now = datetime.now(UTC)
        campaign = store.campaigns.collection.insert_one({"name": "Big", "status": "running"})
        docs = []
        for n in range(size):
            lane = SESSIONS[n % len(SESSIONS)]
            docs.append(
                {
                    "scheduledAt": now,
                    "chatId": f"4477{n:08d}@c.us",
                    "content": "Hello",
                    "session": lane,
                    "campaignId": campaign.inserted_id,
                    "isSent": False,
                    "isPicked": False,
                    "isDeleted": False,
                    "lane": lane,
                    "priority": 0,
                    "plannedAt": now + timedelta(seconds=15 * (n // len(SESSIONS))),
                }
            )
        store.messages.collection.insert_many(docs)
        memory = Memory()
        pacing = Pacing(10, 25)
        tick(store, waha, 20, now=now, pacing=pacing, memory=memory)  # counts it once
        commands.take()
        tick(store, waha, 20, now=now + timedelta(seconds=15), pacing=pacing, memory=memory)
        per_tick = examined(store.client, commands.take())
        status.build(store, now, pacing)
        store.activity.not_sent(50)
        per_status = examined(store.client, commands.take())
        return per_tick, per_status


def main() -> int:
    with _mongodb() as uri:
        for lanes in (0, 200):
            print(f"commands per idle tick, {lanes} lane documents: {idle_commands(uri, lanes)}")
        for size in (1000, 5000):
            per_tick, per_status = campaign_costs(uri, size)
            print(
                f"campaign of {size}: documents examined per tick {per_tick}, "
                f"per status picture {per_status}"
            )
    return 0


@contextmanager
def _mongodb() -> Iterator[str]:
    if os.environ.get("MONGODB_TEST_URI"):
        yield os.environ["MONGODB_TEST_URI"]
        return
    with embedded_mongodb() as uri:
        yield uri


if __name__ == "__main__":
    sys.exit(main())
