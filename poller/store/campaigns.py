"""Campaigns: the web app's pause and cancel flags, and the stats the poller rolls up."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection

from poller.contract import CANCELLED, COMPLETED, PAUSED, id_variants
from poller.store.base import Doc, create_index, insert_once
from poller.store.messages import RECEIPTS, Messages
from poller.store.sweep import SETTLE_CHUNK, Settled, Sweeper

STATUS_INDEX = [("status", ASCENDING)]
# An open campaign is recounted at least this often, whatever the ticks touched: the web app
# may delete its last open message, and it must still complete.
RECOUNT_EVERY = timedelta(minutes=5)
# Open campaigns recounted per tick, at most (each recount reads the campaign's messages).
RECOUNTS_PER_TICK = 5


class Campaigns:
    def __init__(self, collection: Collection[Doc], messages: Messages, sweeper: Sweeper) -> None:
        self.collection = collection
        self.messages = messages
        self.sweeper = sweeper

    def ensure_indexes(self) -> None:
        create_index(self.collection, STATUS_INDEX, "poller_campaign_status")

    def paused(self) -> list[Any]:
        """The ids of the campaigns the web app paused."""
        return [c["_id"] for c in self.collection.find({"status": PAUSED}, {"_id": 1})]

    def to_hold(self) -> list[Any]:
        """Paused campaigns whose messages the poller has not taken out of the plan yet."""
        query = {"status": PAUSED, "heldAt": {"$exists": False}}
        return [c["_id"] for c in self.collection.find(query, {"_id": 1})]

    def to_resume(self) -> list[Any]:
        """Campaigns the poller held that are no longer paused (a cancelled one is settled)."""
        query = {"heldAt": {"$exists": True}, "status": {"$nin": [PAUSED, CANCELLED]}}
        return [c["_id"] for c in self.collection.find(query, {"_id": 1})]

    def mark_held(self, campaign_id: Any, now: datetime | None) -> None:
        """Note that the campaign's messages are out of the plan (`now`), or back in (None)."""
        update = {"$set": {"heldAt": now}} if now else {"$unset": {"heldAt": ""}}
        self.collection.update_one({"_id": campaign_id}, update)

    def insert(self, campaign: Doc) -> bool:
        """Write a campaign (a recurring schedule's occurrence) unless its `_id` exists."""
        return insert_once(self.collection, [campaign]) == 1

    def status(self, campaign_id: Any) -> Any:
        """A campaign's status as the web app (or the poller) wrote it; None without one."""
        found = self.collection.find_one({"_id": {"$in": id_variants(campaign_id)}}, {"status": 1})
        return (found or {}).get("status")

    def cancel(self, now: datetime, budget: int = SETTLE_CHUNK) -> Settled:
        """End the unsent messages of each campaign the web app cancelled and the poller has not
        finished with: `cancelled` (`unknown` where an earlier attempt may have reached
        WhatsApp), up to `budget` messages. Every such campaign is in `campaigns`."""
        settled = Settled()
        open_cancelled = {"status": CANCELLED, "completedAt": {"$exists": False}}
        for campaign in self.collection.find(open_cancelled, {"_id": 1}):
            settled.campaigns.append(campaign["_id"])
            if not settled.more:
                self.sweeper.cancel_unsent(campaign["_id"], now, settled, budget)
        return settled

    def to_recount(self, now: datetime) -> list[Any]:
        """Open campaigns the poller has worked on and not recounted for RECOUNT_EVERY."""
        stale = {
            "status": {"$nin": list(COMPLETED)},
            "completedAt": {"$exists": False},
            "stats": {"$exists": True},
            "$or": [
                {"recountedAt": {"$exists": False}},
                {"recountedAt": {"$lt": now - RECOUNT_EVERY}},
            ],
        }
        found = self.collection.find(stale, {"_id": 1}).sort("recountedAt", 1)
        return [c["_id"] for c in found.limit(RECOUNTS_PER_TICK)]

    def rollup(self, campaign_ids: Iterable[Any], now: datetime) -> None:
        """Recount each campaign; mark it completed once none of its messages can still be sent.
        A cancelled campaign keeps its status and gets `completedAt` once nothing is in flight."""
        for campaign_id in campaign_ids:
            stats, eta = self.messages.campaign_stats(campaign_id)
            ended = stats["sent"] + stats["failed"] + stats["expired"] + stats["cancelled"]
            done = "completed" if stats["sent"] == stats["total"] else "completed_with_failures"
            fields: Doc = {"stats": stats, "recountedAt": now, "eta": eta}
            if ended == stats["total"] > 0:
                cancelled = {"$eq": ["$status", CANCELLED]}
                fields["status"] = {"$cond": [cancelled, CANCELLED, done]}
                fields["completedAt"] = now
            # A finished campaign's numbers were final when it finished: never overwrite them.
            unfinished = {
                "_id": {"$in": id_variants(campaign_id)},
                "status": {"$nin": list(COMPLETED)},
                "completedAt": {"$exists": False},
            }
            self.collection.update_one(unfinished, [{"$set": fields}])
            if stats["total"] == 0:  # a cancelled campaign without messages is done too
                self.collection.update_one(
                    {**unfinished, "status": CANCELLED}, {"$set": {"completedAt": now}}
                )

    def count_receipts(self, campaign_ids: Iterable[Any]) -> None:
        """Recount the delivery receipts of each campaign (`stats.delivered`, `.read`,
        `.deliveryFailed`), finished or not: receipts arrive after the sends."""
        for campaign_id in campaign_ids:
            stats, _ = self.messages.campaign_stats(campaign_id)
            fields = {f"stats.{name}": stats[name] for name in RECEIPTS}
            self.collection.update_one(
                {"_id": {"$in": id_variants(campaign_id)}, "stats": {"$exists": True}},
                {"$set": fields},
            )

    def control(self, campaign_id: Any, status: str, now: datetime) -> bool:
        """Set a campaign's `status` as the web app does: `paused` (one not paused), `running`
        (a paused one) or `cancelled`. Only a campaign the poller works on (it has `stats`)
        and that has not ended; False when there is no such campaign."""
        query: Doc = {"_id": {"$in": id_variants(campaign_id)}, **_open()}
        if status == PAUSED:
            query["status"]["$nin"].append(PAUSED)
        elif status != CANCELLED:
            query["status"] = PAUSED
        result = self.collection.update_one(
            query, {"$set": {"status": status, "statusChangedAt": now}}
        )
        return result.matched_count == 1

    def running(self, limit: int = 50) -> list[Doc]:
        """Campaigns with stats that have not finished, for `poller status` and the dashboard
        (which acts on these)."""
        found = self.collection.find(_open(), {"name": 1, "status": 1, "stats": 1, "eta": 1})
        return list(found.limit(limit))


def _open() -> Doc:
    """A campaign the poller works on (it has `stats`) and that has not ended: not completed,
    not cancelled, no `completedAt`. A new dict each time: callers add to it."""
    return {
        "stats": {"$exists": True},
        "status": {"$nin": [*COMPLETED, CANCELLED]},
        "completedAt": {"$exists": False},
    }
