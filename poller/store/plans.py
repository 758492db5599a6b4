"""What waits, and when it goes: the reads of the messages collection. Every message the poller
has seen and not finished waits in its WhatsApp session's lane (`lane`) for its planned time
(`plannedAt`); the writes that move it are all in `messages`.

A tick reads the queue in two reads, whatever the number of lanes: the messages not yet planned
(`unplanned`: the late ones, the due ones, those due before the next tick, and the undated), and
the planned ones up to the next tick (`planned`: past their deadline, due, coming, and claims
whose poller went away). Each follows an index within bounds that hold about as many documents
as it returns. Planned messages of paused campaigns are filtered out where they are read
(`held`): they are neither claimed nor expired.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.collection import Collection

from poller.contract import CLAIMED, FINAL, NOT_DONE, SENDING, SENT, id_variants
from poller.store.base import Doc, create_index
from poller.store.messages import CAMPAIGN_INDEX, LEASE_INDEX, UNPICKED, gone
from poller.timings import Timings

# Messages the poller has not planned yet have no lane, in due order.
NEW_INDEX = [("lane", ASCENDING), ("isPicked", ASCENDING), ("scheduledAt", ASCENDING)]
# Every planned message in planned order, whatever its lane: the queue's one read.
QUEUE_INDEX = [("plannedAt", ASCENDING)]
# One lane's waiting messages in claim order (to plan it again), and in planned order.
LANE_INDEX = [("lane", ASCENDING), ("priority", DESCENDING), ("plannedAt", ASCENDING)]
PLAN_INDEX = [("lane", ASCENDING), ("plannedAt", ASCENDING)]
# What an operator counts: messages sent, and ended otherwise, by when; receipts by when.
SENT_INDEX = [("sentAt", ASCENDING)]
ENDED_INDEX = [("status", ASCENDING), ("finishedAt", ASCENDING)]
RECEIPT_TIME_INDEXES = ([("deliveredAt", ASCENDING)], [("readAt", ASCENDING)])
# The holds of versions before plans (heldUntil): read once, at start-up.
HOLD_INDEX = [("heldUntil", ASCENDING)]
PLANNED = {"plannedAt": {"$exists": True}}
# What every step needs to know of a message it read.
FIELDS = {
    "session": 1,
    "sessionId": 1,
    "campaignId": 1,
    "chatId": 1,
    "scheduledAt": 1,
    "heldUntil": 1,
    "plannedAt": 1,
    "priority": 1,
    "content": 1,
    "retryAt": 1,
    "isSent": 1,
    "isDeleted": 1,
    "isPicked": 1,
    "lane": 1,
    "status": 1,
    "inDoubt": 1,
    "sendId": 1,
    "leaseUntil": 1,
    "pickedBy": 1,
    "pickedAt": 1,
    "lastError": 1,
    "attempts": 1,
    "optOutReply": 1,
    "wahaServer": 1,
}
# The most messages one planning step reads: the rest are planned by the next.
ADOPT_CHUNK = 500


class Plans:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner

    def ensure_indexes(self) -> None:
        create_index(self.collection, NEW_INDEX, "poller_new")
        waiting = {"partialFilterExpression": PLANNED}
        create_index(self.collection, QUEUE_INDEX, "poller_queue", **waiting)
        create_index(self.collection, LANE_INDEX, "poller_lane", **waiting)
        create_index(self.collection, PLAN_INDEX, "poller_plan", **waiting)
        create_index(self.collection, HOLD_INDEX, "poller_hold", sparse=True)
        create_index(self.collection, SENT_INDEX, "poller_sent", sparse=True)
        ended = {"partialFilterExpression": {"finishedAt": {"$exists": True}}}
        create_index(self.collection, ENDED_INDEX, "poller_ended", **ended)
        for keys in RECEIPT_TIME_INDEXES:
            create_index(self.collection, keys, f"poller_{keys[0][0]}", sparse=True)

    # -- the tick's reads ------------------------------------------------------------------------

    def unplanned(
        self, until: datetime, limit: int = ADOPT_CHUNK, since: datetime | None = None
    ) -> list[Doc]:
        """Messages not yet planned that are due by `until`, or whose scheduledAt is not a date
        (those first), in due order. With `since`: only those due from then on."""
        query = unplanned_query(until, since)
        found = self.collection.find(query, FIELDS, hint=NEW_INDEX, sort=[("scheduledAt", 1)])
        return list(found.limit(limit))

    def planned(
        self, until: datetime, held: Iterable[Any], skip_lanes: Iterable[str], limit: int
    ) -> list[Doc]:
        """Planned messages up to `until`, in planned order, claimed ones included; not those of
        a paused campaign, nor of `skip_lanes`."""
        query = queue_query(until, held, skip_lanes)
        found = self.collection.find(query, FIELDS, hint=QUEUE_INDEX, sort=[("plannedAt", 1)])
        return list(found.limit(limit))

    def lapsed(self, now: datetime, since: datetime, limit: int) -> list[Doc]:
        """Claims and sends whose poller went away (`gone`), in lease order."""
        query = {"status": {"$in": [CLAIMED, SENDING]}, **gone(self.owner, now, since)}
        return list(self.collection.find(query, FIELDS, hint=LEASE_INDEX, limit=limit))

    # -- one lane --------------------------------------------------------------------------------

    def waiting(self, lane: str, held: Iterable[Any] = ()) -> list[Doc]:
        """Every waiting message of the lane, in claim order (to plan it again)."""
        query = {"lane": lane, **PLANNED, **UNPICKED, **NOT_DONE, **_not_in(held)}
        sort = [("priority", DESCENDING), ("plannedAt", ASCENDING)]
        return list(self.collection.find(query, FIELDS, hint=LANE_INDEX, sort=sort))

    def planned_between(self, lane: str, after: datetime, until: datetime) -> datetime | None:
        """The first plannedAt of the lane in (`after`, `until`]."""
        found = self.collection.find_one(
            {"lane": lane, "plannedAt": {"$gt": after, "$lte": until}, **UNPICKED},
            {"plannedAt": 1},
            hint=PLAN_INDEX,
            sort=[("plannedAt", ASCENDING)],
        )
        return found["plannedAt"] if found else None

    # -- one campaign ----------------------------------------------------------------------------

    def campaign_waiting(self, campaign_id: Any, limit: int = 0) -> list[Doc]:
        """A campaign's messages that wait (not claimed, not ended), planned or not."""
        query = {"campaignId": {"$in": id_variants(campaign_id)}, **UNPICKED}
        return list(self.collection.find(query, FIELDS, hint=CAMPAIGN_INDEX, limit=limit))

    def campaign_open(self, campaign_id: Any) -> Doc | None:
        """One message of the campaign that is not done: waiting, or being sent. Done ones the
        web app marked are returned too (the caller retires them)."""
        ids = {"$in": id_variants(campaign_id)}
        found = self.collection.find_one(
            {"campaignId": ids, **UNPICKED}, FIELDS, hint=CAMPAIGN_INDEX
        )
        if found is not None:
            return found
        in_flight = {"campaignId": ids, "isPicked": True, "status": {"$in": [CLAIMED, SENDING]}}
        return self.collection.find_one(in_flight, FIELDS, hint=CAMPAIGN_INDEX)

    # -- the upgrade from earlier versions -------------------------------------------------------

    def unplanned_in_lanes(self, limit: int) -> list[Doc]:
        """Waiting messages in a lane without a plan: what an earlier version left when it
        held a paused campaign, or released a claim of one."""
        query = {"lane": {"$type": "string"}, **UNPICKED, "plannedAt": {"$exists": False}}
        return list(self.collection.find(query, FIELDS, hint=NEW_INDEX, limit=limit))

    def held_until(self, limit: int) -> list[Doc]:
        """Messages an earlier version held back with `heldUntil`, not yet planned."""
        query = {"heldUntil": {"$exists": True}, "lane": None, **UNPICKED}
        return list(self.collection.find(query, FIELDS, hint=HOLD_INDEX, limit=limit))

    # -- what an operator sees -------------------------------------------------------------------

    def count_due(self, now: datetime) -> int:
        """Messages due now and not being sent: planned for now or earlier and before their
        deadline, or not yet seen and due."""
        cutoff = now - self.timings.lookback
        planned = {"plannedAt": {"$gte": cutoff, "$lte": now}, **UNPICKED}
        fresh = {"lane": None, **UNPICKED, "scheduledAt": {"$gte": cutoff, "$lte": now}}
        return self.collection.count_documents(
            planned, hint=QUEUE_INDEX
        ) + self.collection.count_documents(fresh, hint=NEW_INDEX)

    def later(self, now: datetime) -> int:
        """Messages that go later: planned for after now (paced, or waiting to be retried),
        or scheduled for later and not yet seen."""
        planned = {"plannedAt": {"$gt": now}, **UNPICKED}
        unseen = {"lane": None, **UNPICKED, "scheduledAt": {"$gt": now}}
        return self.collection.count_documents(
            planned, hint=QUEUE_INDEX
        ) + self.collection.count_documents(unseen, hint=NEW_INDEX)

    # Each count below follows an index and counts its keys: no document is read.

    def in_progress(self) -> int:
        """Claims and sends in flight (the only messages with a lease)."""
        query = {"status": {"$in": [CLAIMED, SENDING]}}
        return self.collection.count_documents(query, hint=LEASE_INDEX)

    def outcomes_since(self, since: datetime) -> dict[str, int]:
        """How many messages ended in each final status since `since`."""
        counts = {
            SENT: self.collection.count_documents({"sentAt": {"$gte": since}}, hint=SENT_INDEX)
        }
        for status in FINAL:
            if status != SENT:
                query = {"status": status, "finishedAt": {"$gte": since}}
                counts[status] = self.collection.count_documents(query, hint=ENDED_INDEX)
        return {status: counts[status] for status in FINAL}

    def receipts_since(self, since: datetime) -> dict[str, int]:
        """How many messages were delivered, and read, since `since` (their receipts)."""
        return {
            name: self.collection.count_documents({field: {"$gte": since}}, hint=[(field, 1)])
            for name, field in (("delivered", "deliveredAt"), ("read", "readAt"))
        }

    def lanes(self, held: Iterable[Any] = ()) -> dict[str, tuple[int, datetime | None, int]]:
        """Each lane's messages in its plan (waiting, or being sent), its first planned time
        among those not of a `held` (paused) campaign, and how many are of one, for the lanes
        that have any: one read of the plan's index."""
        ids = [v for campaign in held for v in id_variants(campaign)]
        paused = {"$in": ["$campaignId", ids]}
        rows = self.collection.aggregate(
            [
                {"$match": {"lane": {"$type": "string"}, "plannedAt": {"$type": "date"}}},
                {
                    "$group": {
                        "_id": "$lane",
                        "n": {"$sum": 1},
                        "first": {"$min": {"$cond": [paused, None, "$plannedAt"]}},
                        "paused": {"$sum": {"$cond": [paused, 1, 0]}},
                    }
                },
            ],
            hint=dict(PLAN_INDEX),
        )
        return {row["_id"]: (row["n"], row["first"], row["paused"]) for row in rows}


def unplanned_query(until: datetime, since: datetime | None = None) -> Doc:
    """The query of `Plans.unplanned` (on NEW_INDEX; benchmarks explain it)."""
    window = {"$not": {"$gt": until}} if since is None else {"$gte": since, "$lte": until}
    return {"lane": None, **UNPICKED, "scheduledAt": window}


def queue_query(until: datetime, held: Iterable[Any] = (), skip_lanes: Iterable[str] = ()) -> Doc:
    """The query of `Plans.planned` (on QUEUE_INDEX, in plannedAt order; benchmarks explain it)."""
    query: Doc = {"plannedAt": {"$lte": until}, **_not_in(held)}
    lanes = list(skip_lanes)
    if lanes:
        query["lane"] = {"$nin": lanes}
    return query


def _not_in(held: Iterable[Any]) -> Doc:
    """Not a message of these campaigns (as ObjectId or as text)."""
    ids = [v for campaign in held for v in id_variants(campaign)]
    return {"campaignId": {"$nin": ids}} if ids else {}
