"""The plan: every message the poller has seen and not yet finished waits in its WhatsApp
session's lane (`lane`, the session's name) for its planned send time (`plannedAt`), in order of
`priority`. Each query here follows an index within bounds that hold about as many documents as
it returns, however long the lanes are.

A message is planned once, when the poller first sees it due (one write), and planned again only
when an event changes its lane's plan: an outage ends, its campaign resumes, the daily cap or
the quiet hours move it, the lane fell behind or has a hole (one write per message and event).
A message of a paused campaign waits in its lane with no plannedAt until the campaign resumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from poller.contract import FINAL, id_variants
from poller.store.base import Doc, create_index
from poller.store.messages import CAMPAIGN_INDEX, NOT_DONE
from poller.timings import Timings

# Messages the poller has not seen yet have no lane: due ones are planned, late ones expire.
NEW_INDEX = [("lane", ASCENDING), ("isPicked", ASCENDING), ("scheduledAt", ASCENDING)]
# Claims: a lane's due messages, highest priority first, then in planned order.
LANE_INDEX = [("lane", ASCENDING), ("priority", DESCENDING), ("plannedAt", ASCENDING)]
# Times: a lane's messages in planned order, whatever their priority.
PLAN_INDEX = [("lane", ASCENDING), ("plannedAt", ASCENDING)]
# The previous version's holds (heldUntil): read to adopt what it held, never written.
HOLD_INDEX = [("heldUntil", ASCENDING)]
PLANNED = {"plannedAt": {"$exists": True}}
UNPICKED = {"isPicked": {"$ne": True}}
# What planning or claiming a message needs to know of it.
CANDIDATE = {
    "session": 1,
    "sessionId": 1,
    "campaignId": 1,
    "scheduledAt": 1,
    "heldUntil": 1,
    "plannedAt": 1,
    "priority": 1,
    "content": 1,
    "retryAt": 1,
    "isSent": 1,
    "isDeleted": 1,
    "lane": 1,
}
# The most messages one planning step reads: the rest are planned by the next.
ADOPT_CHUNK = 500


class Plans:
    def __init__(self, collection: Collection[Doc], timings: Timings) -> None:
        self.collection = collection
        self.timings = timings

    def ensure_indexes(self) -> None:
        create_index(self.collection, NEW_INDEX, "poller_new")
        waiting = {"partialFilterExpression": PLANNED}
        create_index(self.collection, LANE_INDEX, "poller_lane", **waiting)
        create_index(self.collection, PLAN_INDEX, "poller_plan", **waiting)
        create_index(self.collection, HOLD_INDEX, "poller_hold", sparse=True)

    # -- messages not yet seen ------------------------------------------------------------------

    def new(self, now: datetime) -> list[Doc]:
        """Messages the poller has not planned yet that are due now and not too late, in due
        order: due from scheduledAt, or from the heldUntil the previous version gave them."""
        cutoff = now - self.timings.lookback
        held = {"lane": None, **UNPICKED, "heldUntil": {"$gte": cutoff, "$lte": now}}
        found: dict[Any, Doc] = {}
        for query, hint in (self.new_query(now), (held, HOLD_INDEX)):
            for doc in self.collection.find(
                {**query, **NOT_DONE}, CANDIDATE, hint=hint, limit=ADOPT_CHUNK
            ):
                found.setdefault(doc["_id"], doc)
        return sorted(found.values(), key=_due_key)

    def new_query(self, now: datetime) -> tuple[Doc, list[tuple[str, int]]]:
        """The query of messages not yet seen that came due inside the lookback window, and its
        index (benchmarks explain it)."""
        window = {"$gte": now - self.timings.lookback, "$lte": now}
        return {"lane": None, **UNPICKED, "scheduledAt": window}, NEW_INDEX

    def next_new(self, after: datetime, until: datetime) -> datetime | None:
        """When the first message not yet seen comes due in (`after`, `until`]."""
        window = {"$gt": after, "$lte": until}
        times = []
        for picked in (False, None):  # false, or missing: the web app may not write isPicked
            found = self.collection.find_one(
                {"lane": None, "isPicked": picked, "scheduledAt": window},
                {"scheduledAt": 1},
                hint=NEW_INDEX,
                sort=[("scheduledAt", ASCENDING)],
            )
            if found:
                times.append(found["scheduledAt"])
        held = self.collection.find_one(
            {"lane": None, "heldUntil": window}, {"heldUntil": 1}, hint=HOLD_INDEX
        )
        if held:
            times.append(held["heldUntil"])
        return min(times, default=None)

    def adopt(self, rows: Iterable[Any]) -> list[Any]:
        """Put new messages in their lanes (`lanes.Adoption`: id, lane, priority, at, why), with
        no plannedAt where `at` is None (a paused campaign). The ids this poller adopted; a
        message another poller adopted first keeps that poller's plan."""
        ops, ids = [], []
        for row in rows:
            fields: Doc = {"lane": row.lane, "priority": row.priority}
            if row.at is not None:
                fields["plannedAt"] = row.at
            if row.why is not None:
                fields["lastError"] = row.why
            ops.append(UpdateOne({"_id": row.id, "lane": None, **UNPICKED}, {"$set": fields}))
            ids.append(row.id)
        if not ops:
            return []
        try:
            self.collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:  # a document MongoDB refuses to change: it expires later
            logger.error(
                "{} message(s) could not be planned: {}",
                len(exc.details.get("writeErrors", [])),
                str(exc)[:300],
            )
        adopted = self.collection.find({"_id": {"$in": ids}, "lane": {"$ne": None}}, {"_id": 1})
        return [d["_id"] for d in adopted]

    def reject(self, message_id: Any, status: str, reason: str, now: datetime) -> None:
        """End a new message that cannot be planned, with why."""
        self.collection.update_one(
            {"_id": message_id, "lane": None, **UNPICKED},
            {"$set": {"isPicked": True, "status": status, "finishedAt": now, "lastError": reason}},
        )

    # -- what an operator sees ------------------------------------------------------------------

    def count_due(self, now: datetime) -> int:
        """Messages due now and not being sent: planned for now or earlier, or not yet seen."""
        planned = {"plannedAt": {"$lte": now}, **UNPICKED, **NOT_DONE}
        window = {"$gte": now - self.timings.lookback, "$lte": now}
        fresh = {"lane": None, **UNPICKED, "scheduledAt": window, **NOT_DONE}
        return self.collection.count_documents(
            planned, hint=PLAN_INDEX
        ) + self.collection.count_documents(fresh, hint=NEW_INDEX)

    def waiting_total(self) -> int:
        """Messages waiting in a lane, planned or held (a paused campaign)."""
        query = {"lane": {"$type": "string"}, **UNPICKED, **NOT_DONE}
        return self.collection.count_documents(query, hint=NEW_INDEX)

    def later(self, now: datetime) -> int:
        """Messages scheduled for later, not yet seen."""
        query = {"lane": None, **UNPICKED, "scheduledAt": {"$gt": now}, **NOT_DONE}
        return self.collection.count_documents(query, hint=NEW_INDEX)

    # -- a lane ---------------------------------------------------------------------------------

    def due_query(self, lane: str, now: datetime) -> tuple[Doc, list[tuple[str, int]]]:
        """The query and sort of `due` (benchmarks explain it)."""
        query = {
            "lane": lane,
            "plannedAt": {"$lte": now},
            **UNPICKED,
            "retryAt": {"$not": {"$gt": now}},
        }
        return query, [("priority", DESCENDING), ("plannedAt", ASCENDING)]

    def due(self, lane: str, now: datetime, limit: int) -> list[Doc]:
        """The lane's messages planned for now or earlier, not being sent, in claim order."""
        query, sort = self.due_query(lane, now)
        return list(self.collection.find(query, CANDIDATE, hint=LANE_INDEX, sort=sort, limit=limit))

    def behind(self, lane: str, before: datetime, now: datetime) -> Doc | None:
        """The lane's earliest waiting message planned before `before`, not waiting to retry
        after `now`: the lane fell behind its plan when there is one."""
        query = {
            "lane": lane,
            "plannedAt": {"$lt": before},
            **UNPICKED,
            **NOT_DONE,
            "retryAt": {"$not": {"$gt": now}},
        }
        return self.collection.find_one(
            query, {"plannedAt": 1}, hint=PLAN_INDEX, sort=[("plannedAt", ASCENDING)]
        )

    def oldest(self, lane: str, before: datetime) -> Doc | None:
        """The lane's earliest waiting message planned before `before`, if any."""
        query = {"lane": lane, "plannedAt": {"$lt": before}, **UNPICKED, **NOT_DONE}
        return self.collection.find_one(
            query, {"plannedAt": 1, "retryAt": 1}, hint=PLAN_INDEX, sort=[("plannedAt", ASCENDING)]
        )

    def planned_between(self, lane: str, after: datetime, until: datetime) -> datetime | None:
        """The first plannedAt of the lane in (`after`, `until`]."""
        found = self.collection.find_one(
            {"lane": lane, "plannedAt": {"$gt": after, "$lte": until}, **UNPICKED},
            {"plannedAt": 1},
            hint=PLAN_INDEX,
            sort=[("plannedAt", ASCENDING)],
        )
        return found["plannedAt"] if found else None

    def first(self, lane: str) -> datetime | None:
        """The lane's first plannedAt (`poller status`)."""
        found = self.collection.find_one(
            {"lane": lane, **PLANNED, **UNPICKED, **NOT_DONE},
            {"plannedAt": 1},
            hint=PLAN_INDEX,
            sort=[("plannedAt", ASCENDING)],
        )
        return found["plannedAt"] if found else None

    def waiting(self, lane: str) -> list[Doc]:
        """Every waiting message of the lane, in claim order (to plan it again)."""
        query = {"lane": lane, **PLANNED, **UNPICKED, **NOT_DONE}
        sort = [("priority", DESCENDING), ("plannedAt", ASCENDING)]
        return list(self.collection.find(query, CANDIDATE, hint=LANE_INDEX, sort=sort))

    def count(self, lane: str) -> int:
        """How many messages wait in the lane (`poller status`)."""
        query = {"lane": lane, **PLANNED, **UNPICKED, **NOT_DONE}
        return self.collection.count_documents(query, hint=PLAN_INDEX)

    def move(self, times: Iterable[tuple[Any, datetime]], reason: str | None = None) -> int:
        """Plan waiting messages again: (id, new plannedAt); `reason` goes into lastError."""
        ops = []
        for message_id, at in times:
            fields: Doc = {"plannedAt": at}
            if reason is not None:
                fields["lastError"] = reason
            ops.append(UpdateOne({"_id": message_id, **PLANNED, **UNPICKED}, {"$set": fields}))
        if not ops:
            return 0
        return self.collection.bulk_write(ops, ordered=False).modified_count

    def note(self, lane: str, reason: str) -> None:
        """Say in lastError why the lane's messages wait (once per reason)."""
        self.collection.update_many(
            {"lane": lane, **PLANNED, **UNPICKED, **NOT_DONE, "lastError": {"$ne": reason}},
            {"$set": {"lastError": reason}},
            hint=LANE_INDEX,
        )

    def retire(self, message_ids: list[Any]) -> None:
        """Take messages out of the plan that the web app deleted or marked sent."""
        if message_ids:
            self.collection.update_many(
                {"_id": {"$in": message_ids}, **UNPICKED}, {"$unset": {"plannedAt": ""}}
            )

    def forget(self, message_ids: list[Any]) -> None:
        """Unplan messages the web app rescheduled to later: planned again once due."""
        if message_ids:
            self.collection.update_many(
                {"_id": {"$in": message_ids}, **UNPICKED},
                {"$unset": {"plannedAt": "", "lane": ""}},
            )

    # -- paused campaigns -----------------------------------------------------------------------

    def hold_campaign(self, campaign_id: Any, reason: str) -> int:
        """Take a paused campaign's waiting messages out of the plan: they wait in their lanes,
        never late, until it resumes."""
        query = {
            "campaignId": {"$in": id_variants(campaign_id)},
            **PLANNED,
            **UNPICKED,
            **NOT_DONE,
        }
        update = {"$unset": {"plannedAt": ""}, "$set": {"lastError": reason}}
        return self.collection.update_many(query, update, hint=CAMPAIGN_INDEX).modified_count

    def held(self, campaign_id: Any) -> list[Doc]:
        """A resumed campaign's messages waiting in their lanes with no plan, in due order."""
        query = {
            "campaignId": {"$in": id_variants(campaign_id)},
            "lane": {"$type": "string"},
            "plannedAt": {"$exists": False},
            "status": {"$nin": list(FINAL)},
            **UNPICKED,
            **NOT_DONE,
        }
        found = self.collection.find(query, CANDIDATE, hint=CAMPAIGN_INDEX)
        return sorted(found, key=_due_key)

    def resume(self, times: Iterable[tuple[Any, datetime]]) -> int:
        """Plan a resumed campaign's messages: (id, plannedAt)."""
        ops = [
            UpdateOne(
                {"_id": message_id, "plannedAt": {"$exists": False}, **UNPICKED},
                {"$set": {"plannedAt": at, "lastError": None}},
            )
            for message_id, at in times
        ]
        return self.collection.bulk_write(ops, ordered=False).modified_count if ops else 0


def due_time(doc: Doc) -> datetime:
    """When a message not yet planned is due: its scheduledAt, or a later heldUntil the
    previous version gave it."""
    scheduled, held = doc.get("scheduledAt"), doc.get("heldUntil")
    if not isinstance(scheduled, datetime):
        return held if isinstance(held, datetime) else datetime.min.replace(tzinfo=UTC)
    return held if isinstance(held, datetime) and held > scheduled else scheduled


def _due_key(doc: Doc) -> tuple[datetime, str]:
    return (due_time(doc), str(doc["_id"]))
