"""What recurring schedules cost a tick: MongoDB commands (round trips) per tick, with and
without definitions, and for the tick that materialises an occurrence.

    .venv/bin/python benchmarks/recurring.py [--definitions 10] [--targets 40]

Against SecantusDB (a process of its own) and the WAHA simulator, pacing off, on a fake clock:
an idle tick with no definition; the first tick that sees `--definitions` definitions (weekly,
Mondays 09:00 London, `--targets` targets each); an idle tick with them; the tick, 20 s before
09:00, that materialises every definition's occurrence. Command monitoring counts the
commands, and those on `scheduledefinitions`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import MongoClient, monitoring

from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import mongo_daemon
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient

KEY = "bench-key"
MONDAY_9 = datetime(2026, 11, 30, 9, tzinfo=UTC)


class Commands(monitoring.CommandListener):
    """Counts the commands sent, by collection."""

    def __init__(self) -> None:
        self.by_collection: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        if isinstance(target, str) and event.command_name not in ("endSessions", "hello"):
            self.by_collection[target] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--definitions", type=int, default=10)
    parser.add_argument("--targets", type=int, default=40)
    args = parser.parse_args()
    waha = WahaSimulator(api_key=KEY).start()
    commands = Commands()
    with mongo_daemon() as daemon:
        client: MongoClient[dict[str, Any]] = MongoClient(
            daemon.uri, tz_aware=True, event_listeners=[commands]
        )
        settings = Settings(mongodb_uri=daemon.uri, mongodb_db="recurring", instance_id="bench")
        store = Store(client, settings)
        store.ensure_indexes()
        sender = WahaClient(waha.url, KEY, 30)
        pacing = Pacing(zone=settings.zone)

        def measure(label: str, now: datetime) -> None:
            commands.by_collection.clear()
            counts = tick(store, sender, 20, now=now, pacing=pacing)
            total = sum(commands.by_collection.values())
            ours = commands.by_collection[settings.definitions_collection]
            print(
                f"{label:<44} {total:>4} commands, {ours:>3} on definitions, "
                f"occurred={counts.occurred}"
            )

        measure("idle tick, no definition", MONDAY_9 - timedelta(hours=2))
        store.definitions.collection.insert_many(
            [
                {
                    "name": f"Menu {d}",
                    "cron": "0 9 * * 1",
                    "timezone": "Europe/London",
                    "content": "This week's menu",
                    "targets": [f"44770{d:03d}{t:05d}" for t in range(args.targets)],
                    "session": "default",
                    "createdAt": MONDAY_9 - timedelta(days=1),
                }
                for d in range(args.definitions)
            ]
        )
        n = args.definitions
        measure(f"first tick that sees {n} definitions", MONDAY_9 - timedelta(minutes=119))
        measure(f"idle tick, {n} definitions", MONDAY_9 - timedelta(minutes=118))
        measure(f"tick that materialises {n} occurrences", MONDAY_9 - timedelta(seconds=20))
        messages = store.messages.collection.count_documents({})
        print(f"messages written: {messages} ({n} x {args.targets})")
        sender.close()
        client.close()
    waha.stop()


if __name__ == "__main__":
    main()
