"""One document per WhatsApp session (a lane): when it may send next and which poller holds its
turn (pacing across replicas), how many messages it sent on its local day, its plan's next free
slot, and why it cannot send when it cannot."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from poller.plan import Slots
from poller.store.base import Doc
from poller.timings import Timings

# The outcome of Turns.reserve: the session's turn to send, or why not.
TAKEN, BUSY, CAPPED = "taken", "busy", "capped"


class Turns:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner

    def reserve(self, session: str, now: datetime, day: str, cap: int | None) -> str:
        """Take the session's turn to send: TAKEN, or BUSY (another message of it is being
        sent, or its pacing gap has not passed), or CAPPED (it sent `cap` messages on `day`).

        One conditional upsert: of two replicas asking at once, exactly one gets the turn.
        """
        if cap is not None and cap <= 0:
            return CAPPED
        query: Doc = {"_id": session, "nextAt": {"$not": {"$gt": now}}}
        if cap is not None:
            query["$or"] = [{"day": {"$ne": day}}, {"count": {"$lt": cap}}]
        today = {"$eq": ["$day", day]}
        try:
            self.collection.update_one(
                query,
                [
                    {
                        "$set": {
                            "nextAt": now + self.timings.turn_hold,
                            "by": self.owner,
                            "count": {
                                "$cond": [today, {"$add": [{"$ifNull": ["$count", 0]}, 1]}, 1]
                            },
                            "day": day,
                        }
                    }
                ],
                upsert=True,
            )
            return TAKEN
        except DuplicateKeyError:
            current = self.collection.find_one({"_id": session}) or {}
        next_at = current.get("nextAt")
        if isinstance(next_at, datetime) and next_at > now:
            return BUSY
        return CAPPED if cap is not None and current.get("day") == day else BUSY

    def fence(self, session: str, now: datetime) -> bool:
        """Renew this poller's turn for the send it is about to make; False when the turn
        lapsed and another poller took it (this message must then wait)."""
        result = self.collection.update_one(
            {"_id": session, "by": self.owner},
            {"$set": {"nextAt": now + self.timings.fence_hold}},
        )
        return result.matched_count == 1

    def end(self, session: str, next_at: datetime, sent: bool) -> None:
        """Give the turn back: the session's next message waits until `next_at`. A turn that
        sent nothing does not count towards the day's cap."""
        update: Doc = {"$set": {"nextAt": next_at}}
        if not sent:
            update["$inc"] = {"count": -1}
        self.collection.update_one({"_id": session, "by": self.owner}, update)

    def waiting(self, since: datetime) -> dict[str, datetime]:
        """Sessions whose next turn comes after `since`, with when."""
        return {d["_id"]: d["nextAt"] for d in self.collection.find({"nextAt": {"$gt": since}})}

    # -- lanes ----------------------------------------------------------------------------------

    def lanes(self) -> dict[str, Doc]:
        """Every session's document, by session name, in name order."""
        return {d["_id"]: d for d in self.collection.find({}).sort("_id", 1)}

    def lane(self, name: str) -> Doc | None:
        """One session's document."""
        return self.collection.find_one({"_id": name})

    def slots(self, lane: Doc | None, now: datetime, day: str, fresh: bool = False) -> Slots:
        """Where a lane's plan goes on: its next free slot, with the sends planned on that
        slot's day; from `now` when that slot passed, or when `fresh` (a new plan): the sends
        made today then count towards today's cap."""
        lane = lane or {}
        at, planned_day = lane.get("tail"), lane.get("planDay")
        if not fresh and isinstance(at, datetime) and at > now and isinstance(planned_day, str):
            return Slots(at, planned_day, int(lane.get("planCount") or 0))
        sent = int(lane.get("count") or 0) if lane.get("day") == day else 0
        return Slots(now, day, sent)

    def ensure(self, lanes: Iterable[str]) -> None:
        """Make sure these lanes have their document."""
        for lane in lanes:
            self.collection.update_one({"_id": lane}, {"$setOnInsert": {}}, upsert=True)

    def save_slots(self, lane: str, slots: Slots) -> None:
        self.collection.update_one(
            {"_id": lane},
            {"$set": {"tail": slots.at, "planDay": slots.day, "planCount": slots.count}},
            upsert=True,
        )

    def block(self, lane: str, reason: str | None) -> None:
        """Note why the lane cannot send (None: it can again)."""
        update: dict[str, Any] = (
            {"$set": {"blocked": reason}} if reason is not None else {"$unset": {"blocked": ""}}
        )
        self.collection.update_one({"_id": lane}, update, upsert=reason is not None)
