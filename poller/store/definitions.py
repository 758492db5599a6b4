"""Recurring schedules: the web app's definitions, and what the poller notes on them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.collection import Collection

from poller.store.base import Doc

# What the web app may write in `isActive` to stop a definition; anything else (or nothing)
# leaves it active.
NO = [False, 0, "false"]
# Each tick reads every definition without what only an occurrence needs.
LIGHT = {"targets": 0, "content": 0, "media": 0}


class Definitions:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def light(self) -> list[Doc]:
        """Every definition, without its targets and content (`get` reads those)."""
        return list(self.collection.find({}, LIGHT))

    def get(self, definition_id: Any) -> Doc | None:
        return self.collection.find_one({"_id": definition_id})

    def note(self, definition_id: Any, fields: Doc, unset: tuple[str, ...] = ()) -> None:
        update: Doc = {"$set": fields} if fields else {}
        if unset:
            update["$unset"] = dict.fromkeys(unset, "")
        if update:
            self.collection.update_one({"_id": definition_id}, update)

    def reached(self, definition_id: Any, at: datetime, fine: bool) -> None:
        """Note that every occurrence up to `at` is materialised or recorded as missed; `fine`:
        the definition could be used, and its `lastError` no longer holds."""
        update: Doc = {"$max": {"lastOccurrenceAt": at}}
        if fine:
            update["$unset"] = {"lastError": ""}
        self.collection.update_one({"_id": definition_id}, update)

    def listing(self, limit: int = 50) -> list[Doc]:
        """Active definitions, for `poller status`."""
        found = self.collection.find(
            {"isActive": {"$nin": NO}},
            {"name": 1, "cron": 1, "timezone": 1, "nextOccurrenceAt": 1, "lastError": 1},
        )
        return list(found.limit(limit))
