"""Counting what MongoDB writes: the documents each write command changed, by collection, for
the tests and benchmarks that bound the poller's write cost."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pymongo import monitoring

WRITES = ("update", "insert", "delete", "findAndModify")


class Writes(monitoring.CommandListener):
    """Pass it to MongoClient(event_listeners=[...]). `changed[collection]` counts documents
    changed; `planned[collection]` those of them that updates setting `plannedAt` changed (a
    plan, or a plan corrected)."""

    def __init__(self) -> None:
        self.changed: Counter[str] = Counter()
        self.planned: Counter[str] = Counter()
        self._started: dict[int, tuple[str, bool]] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in WRITES:
            collection = str(event.command[event.command_name])
            self._started[event.request_id] = (collection, _plans(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        found = self._started.pop(event.request_id, None)
        if found is None:
            return
        collection, plans = found
        reply = event.reply
        if event.command_name == "findAndModify":
            n = 1 if reply.get("value") is not None else 0
        else:
            n = reply.get("nModified", reply.get("n", 0)) + len(reply.get("upserted", []))
        self.changed[collection] += n
        if plans:
            self.planned[collection] += n

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._started.pop(event.request_id, None)

    def take(self, collection: str) -> int:
        """Documents of `collection` changed since the last take; the counts start again."""
        taken = self.changed[collection]
        self.changed.clear()
        self.planned.clear()
        return taken


def _plans(command: Any) -> bool:
    """Whether an update command sets plannedAt (its first statement tells: the poller writes
    plans in commands of their own)."""
    updates = command.get("updates") or []
    if not updates:
        return False
    change = updates[0].get("u")
    return isinstance(change, dict) and "plannedAt" in change.get("$set", {})
