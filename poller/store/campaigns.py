"""Campaigns: the web app's pause and cancel flags, read once a tick, and the stats the poller
keeps (`$inc` from the transitions, a full recount only when needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.collection import Collection

from poller.contract import CANCELLED, COMPLETED, PAUSED, id_variants
from poller.stats import RECEIPTS, recount_pipeline, stats_from
from poller.store.base import Doc, create_index, insert_once

STATUS_INDEX = [("status", ASCENDING)]
# Open campaigns: no completedAt (missing is null in an index).
OPEN_INDEX = [("completedAt", ASCENDING)]
# An open campaign is recounted at least this often: a crash between a message's outcome and
# its campaign's count, or a message the web app removed, is repaired by then.
RECOUNT_EVERY = timedelta(minutes=5)
# Open campaigns recounted that way per tick, at most (each recount reads the campaign).
RECOUNTS_PER_TICK = 5


@dataclass
class Flags:
    """The open campaigns as a tick finds them, by what the poller does about each."""

    # Paused, or paused when the poller last looked and not yet resumed by it: their messages
    # are neither claimed nor expired.
    held: list[Any] = field(default_factory=list)
    newly_paused: list[Any] = field(default_factory=list)
    resumed: list[Any] = field(default_factory=list)
    cancelled: list[Any] = field(default_factory=list)
    # Open campaigns the poller works on (they have stats).
    working: list[Doc] = field(default_factory=list)


class Campaigns:
    def __init__(self, collection: Collection[Doc], messages: Collection[Doc]) -> None:
        self.collection = collection
        self.messages = messages

    def ensure_indexes(self) -> None:
        create_index(self.collection, STATUS_INDEX, "poller_campaign_status")
        create_index(self.collection, OPEN_INDEX, "poller_campaign_open")

    def flags(self) -> Flags:
        """Every open campaign, in one read: which are paused, resumed, cancelled."""
        found = self.collection.find(
            {"completedAt": None, "status": {"$nin": list(COMPLETED)}},
            {"status": 1, "heldAt": 1, "stats": 1, "recountedAt": 1, "eta": 1},
            hint=OPEN_INDEX,
        )
        flags = Flags()
        for campaign in found:
            paused, held = campaign.get("status") == PAUSED, "heldAt" in campaign
            if paused or held:
                flags.held.append(campaign["_id"])
            if paused and not held:
                flags.newly_paused.append(campaign["_id"])
            if held and not paused:
                flags.resumed.append(campaign["_id"])
            if campaign.get("status") == CANCELLED:
                flags.cancelled.append(campaign["_id"])
            if isinstance(campaign.get("stats"), dict):
                flags.working.append(campaign)
        return flags

    def mark_held(self, campaign_id: Any, now: datetime) -> None:
        """Note that the poller saw the campaign paused: its messages wait, never late."""
        self.collection.update_one(
            {"_id": {"$in": id_variants(campaign_id)}, "status": PAUSED, "heldAt": None},
            {"$set": {"heldAt": now}},
        )

    def unhold(self, campaign_id: Any) -> None:
        """The campaign's messages are planned again: it is no longer held."""
        self.collection.update_one(
            {"_id": campaign_id, "heldAt": {"$exists": True}, "status": {"$ne": PAUSED}},
            {"$unset": {"heldAt": ""}},
        )

    def statuses(self, campaign_ids: list[Any]) -> dict[str, Any]:
        """The status of each of these campaigns, by id as text."""
        ids = [v for c in campaign_ids for v in id_variants(c)]
        if not ids:
            return {}
        found = self.collection.find({"_id": {"$in": ids}}, {"status": 1})
        return {str(c["_id"]): c.get("status") for c in found}

    def insert(self, campaign: Doc) -> bool:
        """Write a campaign (a recurring schedule's occurrence) unless its `_id` exists."""
        return insert_once(self.collection, [campaign]) == 1

    # -- stats -----------------------------------------------------------------------------------

    def add(self, campaign_id: Any, change: dict[str, int]) -> dict[str, Any] | None:
        """Add `change` to an open campaign's stats (one `$inc`); its stats after, or None when
        it has none yet (or has finished, or does not exist)."""
        found = self.collection.find_one_and_update(
            {
                "_id": {"$in": id_variants(campaign_id)},
                "stats": {"$type": "object"},
                **_unfinished(),
            },
            {"$inc": {f"stats.{name}": n for name, n in change.items()}},
            {"stats": 1},
            return_document=ReturnDocument.AFTER,
        )
        return found.get("stats") if found else None

    def recount(self, campaign_id: Any, now: datetime) -> bool:
        """Count an open campaign's messages afresh; complete it when none of them can still be
        sent (a cancelled one keeps its status). True when it completed. A campaign that has
        finished, or that no document describes, is not read."""
        unfinished = {"_id": {"$in": id_variants(campaign_id)}, **_unfinished()}
        if self.collection.find_one(unfinished, {"_id": 1}) is None:
            return False
        rows = list(self.messages.aggregate(recount_pipeline(campaign_id)))
        stats, still_open, eta = stats_from(rows)
        fields: Doc = {"stats": stats, "recountedAt": now, "eta": eta}
        if still_open == 0:
            done = "completed" if stats["sent"] == stats["total"] else "completed_with_failures"
            cancelled = {"$eq": ["$status", CANCELLED]}
            fields["status"] = {"$cond": [cancelled, CANCELLED, done]}
            fields["completedAt"] = now
        result = self.collection.update_one(unfinished, [{"$set": fields}])
        return still_open == 0 and result.modified_count == 1

    def count_receipts(self, campaign_ids: Any) -> None:
        """Recount the delivery receipts of each campaign (`stats.delivered`, `.read`,
        `.deliveryFailed`), finished or not: receipts arrive after the sends."""
        for campaign_id in campaign_ids:
            stats, _, _ = stats_from(list(self.messages.aggregate(recount_pipeline(campaign_id))))
            fields = {f"stats.{name}": stats[name] for name in RECEIPTS}
            self.collection.update_one(
                {"_id": {"$in": id_variants(campaign_id)}, "stats": {"$exists": True}},
                {"$set": fields},
            )

    # -- the dashboard and `poller status` -------------------------------------------------------

    def control(self, campaign_id: Any, status: str, now: datetime) -> bool:
        """Set a campaign's `status` as the web app does: `paused` (one not paused), `running`
        (a paused one) or `cancelled`. Only a campaign the poller works on (it has `stats`:
        its messages were seen) and that has not ended; False when there is no such campaign:
        one the web app still drafts is not written to."""
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
        """Campaigns that have not finished and whose messages the poller has seen (they have
        stats), for `poller status` and the dashboard (which acts on these). A paused one has
        no `eta`: nothing of it goes out until it is resumed."""
        found = self.collection.find(_open(), {"name": 1, "status": 1, "stats": 1, "eta": 1})
        return [{**c, "eta": None} if c.get("status") == PAUSED else c for c in found.limit(limit)]


def due_recount(campaign: Doc, now: datetime) -> bool:
    """Whether an open campaign was last recounted more than RECOUNT_EVERY ago."""
    at = campaign.get("recountedAt")
    return not isinstance(at, datetime) or at < now - RECOUNT_EVERY


def _unfinished() -> Doc:
    return {"status": {"$nin": list(COMPLETED)}, "completedAt": {"$exists": False}}


def _open() -> Doc:
    """A campaign the poller works on (it has `stats`) and that has not ended: not completed,
    not cancelled, no `completedAt`. A new dict each time: callers add to it."""
    return {
        "stats": {"$exists": True},
        "status": {"$nin": [*COMPLETED, CANCELLED]},
        "completedAt": {"$exists": False},
    }
