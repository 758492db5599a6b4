"""One heartbeat document per live poller; MongoDB deletes it once it is stale."""

from __future__ import annotations

from datetime import datetime

from pymongo.collection import Collection

from poller.store.base import Doc, create_index
from poller.timings import Timings


class Heartbeats:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner

    def ensure_indexes(self) -> None:
        # MongoDB deletes a heartbeat once its aliveUntil has passed (its TTL monitor runs every
        # 60 s); readers compare aliveUntil with now and do not wait for that.
        create_index(self.collection, "aliveUntil", "poller_heartbeat_expiry", expireAfterSeconds=0)

    def beat(self, fields: Doc, now: datetime) -> None:
        beat = {
            "_id": self.owner,
            **fields,
            "lastSeenAt": now,
            "aliveUntil": now + self.timings.heartbeat_max_age,
        }
        self.collection.replace_one({"_id": self.owner}, beat, upsert=True)

    def remove(self) -> None:
        self.collection.delete_one({"_id": self.owner})

    def live(self, now: datetime, instance: str | None = None) -> list[Doc]:
        """Heartbeats of pollers alive now, newest first; `instance` matches an id or the host."""
        query: Doc = {"aliveUntil": {"$gt": now}}
        if instance:
            query["$or"] = [{"_id": instance}, {"instance": instance}, {"host": instance}]
        return list(self.collection.find(query).sort("lastSeenAt", -1))
