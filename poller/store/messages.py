"""The scheduled messages: finding work, claims as leases, outcomes, and the sweep of what is
late or abandoned. Every query on the messages collection is built here.

`claimed` and `sending` are leases: `pickedBy` owns them until `leaseUntil`. A message is due
from its `scheduledAt`, or from its `heldUntil` when the poller itself held it back (pacing, the
daily cap, quiet hours, a paused campaign): that wait never expires it. A `heldUntil` older than
`scheduledAt` (the web app rescheduled it) no longer counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection

from poller.contract import (
    CANCELLED,
    CLAIMED,
    EXPIRED,
    FAILED,
    FINAL,
    PENDING,
    RETRY,
    SENDING,
    SENT,
    UNKNOWN,
    YES,
    campaign_ref,
    id_variants,
)
from poller.store.base import Doc, create_index
from poller.timings import Timings

NOT_DONE = {"isSent": {"$nin": YES}, "isDeleted": {"$nin": YES}}
# Key patterns, hinted by pattern so an identical index the web app made under another name serves.
CLAIM_INDEX = [("isPicked", ASCENDING), ("scheduledAt", ASCENDING)]
LEASE_INDEX = [("leaseUntil", ASCENDING)]
CAMPAIGN_INDEX = [("campaignId", ASCENDING)]
HOLD_INDEX = [("heldUntil", ASCENDING)]
Hint = list[tuple[str, int]]
# Held until after its scheduled time: due from heldUntil, not from scheduledAt.
HELD = {"$gt": ["$heldUntil", "$scheduledAt"]}
# What choosing a message to claim needs to know of it.
CANDIDATE = {"session": 1, "sessionId": 1, "campaignId": 1, "scheduledAt": 1, "heldUntil": 1}
# Candidates read per page while choosing what to claim.
PAGE = 100

# Chooses, from a page of candidates in due order, the ids to claim (at most `room`).
Chooser = Callable[[list[Doc], int], list[Any]]


class Messages:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner

    def ensure_indexes(self) -> None:
        """The indexes of the claim, the lease sweep, the rollup and the holds."""
        for keys, name, sparse in (
            (CLAIM_INDEX, "poller_claim", False),
            (LEASE_INDEX, "poller_lease", True),
            (CAMPAIGN_INDEX, "poller_campaign", True),
            (HOLD_INDEX, "poller_hold", True),
        ):
            create_index(self.collection, keys, name, sparse=sparse)

    # -- what is due ----------------------------------------------------------------------------

    def claimable(self, now: datetime) -> Doc:
        """Due, never-finished messages whose scheduled time is inside the lookback window
        (and that the poller is not holding back)."""
        return {
            "isPicked": {"$ne": True},
            "scheduledAt": {"$gte": now - self.timings.lookback, "$lte": now},
            "$expr": {"$not": [HELD]},
            **NOT_DONE,
            "retryAt": {"$not": {"$gt": now}},
        }

    def held(self, now: datetime) -> Doc:
        """Due, never-finished messages the poller held back until a time inside the window."""
        return {
            "heldUntil": {"$gte": now - self.timings.lookback, "$lte": now},
            "$expr": HELD,
            "isPicked": {"$ne": True},
            **NOT_DONE,
            "retryAt": {"$not": {"$gt": now}},
        }

    def due(self, now: datetime) -> list[tuple[Doc, Hint]]:
        """The queries of every message that may be sent now, each with the index it needs."""
        return [(self.claimable(now), CLAIM_INDEX), (self.held(now), HOLD_INDEX)]

    def due_candidates(self, now: datetime) -> Iterator[Doc]:
        """Every message due now, with what choosing it needs to know (CANDIDATE)."""
        for query, hint in self.due(now):
            yield from self.collection.find(query, CANDIDATE, hint=hint)

    def count_due(self, now: datetime) -> int:
        """Messages due now and not yet claimed, held ones included."""
        return sum(self.collection.count_documents(q, hint=h) for q, h in self.due(now))

    def next_due(self, after: datetime, until: datetime) -> datetime | None:
        """When the first message due in (`after`, `until`] comes due: its scheduledAt, or the
        heldUntil the poller gave it (quiet hours, a daily cap). `after` may be in the past
        (the last claim): what came due since then is due now.

        Three reads that follow an index in time order and stop at their first match, with no
        filter beyond the index's own fields: a message that is deleted or sent by then only
        makes a tick find nothing to do.
        """
        window = {"$gt": after, "$lte": until}
        found = [
            self.collection.find_one(
                # false, or missing: the web app may not write isPicked at all
                {"isPicked": picked, "scheduledAt": window},
                {"scheduledAt": 1, "_id": 0},
                sort=[("scheduledAt", ASCENDING)],
            )
            for picked in (False, None)
        ]
        held = self.collection.find_one(
            {"heldUntil": window}, {"heldUntil": 1, "_id": 0}, sort=[("heldUntil", ASCENDING)]
        )
        times = [d["scheduledAt"] for d in found if d]
        if held:
            times.append(held["heldUntil"])
        return min(times, default=None)

    # -- claims ---------------------------------------------------------------------------------

    def taken_over(self, now: datetime, since: datetime) -> Doc:
        """Claims to take over while their message is less than `takeover_limit` late.

        A send in flight is taken over only under its pre-generated WAHA message id: sent again
        under the same id, WAHA delivers it at most once.
        """
        return {
            "$and": [
                gone(self.owner, now, since),
                {"$or": [{"status": CLAIMED}, {"status": SENDING, "sendId": {"$type": "string"}}]},
                _due_from(now - self.timings.takeover_limit),
            ],
            **NOT_DONE,
        }

    def claim(self, now: datetime, since: datetime, limit: int, choose: Chooser) -> list[Doc]:
        """Atomically take up to `limit` messages: lapsed claims first, then newly due ones, in
        due order; `choose` picks from each page of candidates the ones to take.

        Each document is taken by one conditional update, so of two pollers racing for it
        exactly one wins; the other's update simply does not match.
        """
        taken: list[Doc] = []
        sources = [(self.taken_over(now, since), LEASE_INDEX), *self.due(now)]
        for query, hint in sources:
            order = hint[-1][0]
            found = self.collection.find(query, CANDIDATE, hint=hint, sort=[(order, 1)])
            page: list[Doc] = []
            for doc in found.batch_size(PAGE):
                page.append(doc)
                if len(page) == PAGE:
                    taken += self._take(query, choose(page, limit - len(taken)), now)
                    page = []
                    if len(taken) >= limit:
                        break
            if page and len(taken) < limit:
                taken += self._take(query, choose(page, limit - len(taken)), now)
            found.close()
            if len(taken) >= limit:
                break
        taken.sort(key=_due_key)
        return taken

    def _take(self, query: Doc, ids: list[Any], now: datetime) -> list[Doc]:
        if not ids:
            return []
        self.collection.update_many(
            {"_id": {"$in": ids}, **query},
            [
                {
                    "$set": {
                        "isPicked": True,
                        # A send taken over in flight may have reached WhatsApp.
                        "inDoubt": {
                            "$or": [{"$eq": ["$status", SENDING]}, {"$eq": ["$inDoubt", True]}]
                        },
                        "status": CLAIMED,
                        "pickedBy": self.owner,
                        "pickedAt": now,
                        "leaseUntil": now + self.timings.lease,
                    }
                }
            ],
        )
        mine = {"_id": {"$in": ids}, "pickedBy": self.owner, "status": CLAIMED, "pickedAt": now}
        return list(self.collection.find(mine))

    def extend(self, message_ids: Iterable[Any], until: datetime) -> None:
        """Renew the lease on claims this poller still holds."""
        self.collection.update_many(
            {"_id": {"$in": list(message_ids)}, "pickedBy": self.owner, "status": CLAIMED},
            {"$set": {"leaseUntil": until}},
        )

    # -- messages that wait ---------------------------------------------------------------------

    def hold(
        self,
        now: datetime,
        ids: list[Any] | None,
        until: datetime | None = None,
        reason: str | None = None,
        which: Doc | None = None,
    ) -> int:
        """Hold due messages back (those of `ids`, or every one, or those `which` matches): they
        are late from `until` on, not before.

        With `until` (the daily cap, quiet hours) they are not claimed before it either.
        Without it (pacing, a paused campaign) they stay claimable, and only those held for
        a while are written, so that a long wait costs one write per message now and then.
        """
        if ids is not None and not ids:
            return 0
        fields: Doc = {"heldUntil": until or now}
        if reason is not None:
            fields["lastError"] = reason
        which = {**(which or {}), **({} if ids is None else {"_id": {"$in": ids}})}
        if until is None:
            which.update(due_before(now - self.timings.hold_refresh))
        held = 0
        for query, hint in self.due(now):
            result = self.collection.update_many(
                {"$and": [query, which]}, {"$set": fields}, hint=hint
            )
            held += result.modified_count
        return held

    def hold_campaigns(self, now: datetime, campaign_ids: list[Any]) -> None:
        """Hold the due messages of these (paused) campaigns back, as `hold` does for pacing."""
        if campaign_ids:
            variants = [v for c in campaign_ids for v in id_variants(c)]
            self.hold(now, None, which={"campaignId": {"$in": variants}})

    def note_waiting(self, now: datetime, reason: str, ids: list[Any] | None = None) -> None:
        """Say in lastError why due messages (those of `ids`, or every one) are not sent now."""
        if ids is not None and not ids:
            return
        which: Doc = {"lastError": {"$ne": reason}}
        if ids is not None:
            which["_id"] = {"$in": ids}
        for query, hint in self.due(now):
            self.collection.update_many(
                {"$and": [query, which]}, {"$set": {"lastError": reason}}, hint=hint
            )

    # -- one message's life ---------------------------------------------------------------------

    def start_sending(self, message_id: Any, now: datetime, send_id: str | None = None) -> bool:
        """Mark a claimed message as in flight, with the WAHA message id it will be sent under
        (kept for every retry); False when it is no longer ours, or was deleted."""
        fields: Doc = {"status": SENDING, "leaseUntil": now + self.timings.send_lease}
        if send_id:
            fields["sendId"] = send_id
        result = self.collection.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": CLAIMED, **NOT_DONE},
            {"$set": fields, "$inc": {"attempts": 1}},
        )
        return result.modified_count == 1

    def mark_sent(self, message_id: Any, waha_message_id: str | None, now: datetime) -> bool:
        # `unknown` too: a slow send that another poller gave up on did go out after all.
        result = self.collection.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [SENDING, UNKNOWN]}},
            {
                "$set": {
                    "status": SENT,
                    "isSent": True,
                    "sentAt": now,
                    "wahaMessageId": waha_message_id,
                    "lastError": None,
                },
                "$unset": {"leaseUntil": "", "retryAt": "", "inDoubt": "", "heldUntil": ""},
            },
        )
        return result.modified_count == 1

    def finish(self, message_id: Any, status: str, reason: str, now: datetime) -> None:
        """End a message this poller holds as `failed`, `unknown` or `cancelled`, with why."""
        self.collection.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {
                "$set": {"status": status, "finishedAt": now, "lastError": reason},
                "$unset": {"leaseUntil": "", "retryAt": "", "heldUntil": ""},
            },
        )

    def status_of(self, message_id: Any) -> Any:
        return (self.collection.find_one({"_id": message_id}, {"status": 1}) or {}).get("status")

    def release(
        self,
        message_ids: Iterable[Any],
        reason: str | None = None,
        retry_at: datetime | None = None,
        in_doubt: bool = False,
        held_until: datetime | None = None,
    ) -> int:
        """Give claims back: they become claimable again (after `retry_at`, when given).
        `in_doubt`: the last attempt may have reached WhatsApp (it timed out). `held_until`:
        the poller holds them back until then (see `hold`)."""
        ids = list(message_ids)
        if not ids:
            return 0
        fields: Doc = {"isPicked": False, "status": RETRY if retry_at else PENDING}
        if in_doubt:
            fields["inDoubt"] = True
        if reason is not None:
            fields["lastError"] = reason
        if retry_at is not None:
            fields["retryAt"] = retry_at
        if held_until is not None:
            fields["heldUntil"] = held_until
        result = self.collection.update_many(
            {"_id": {"$in": ids}, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {"$set": fields, "$unset": {"pickedBy": "", "leaseUntil": ""}},
        )
        return result.modified_count

    # -- what an operator sees ------------------------------------------------------------------

    def in_progress(self) -> int:
        return self.collection.count_documents({"status": {"$in": [CLAIMED, SENDING]}})

    def scheduled_later(self, now: datetime) -> int:
        later = {"isPicked": {"$ne": True}, "scheduledAt": {"$gt": now}, **NOT_DONE}
        return self.collection.count_documents(later, hint=CLAIM_INDEX)

    def outcomes_since(self, since: datetime) -> dict[str, int]:
        """How many messages ended in each final status since `since`."""
        ended = {"$or": [{"sentAt": {"$gte": since}}, {"finishedAt": {"$gte": since}}]}
        rows = self.collection.aggregate(
            [{"$match": ended}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        )
        by_status = {row["_id"]: row["n"] for row in rows}
        return {status: by_status.get(status, 0) for status in FINAL}

    def campaign_stats(self, campaign_id: Any) -> dict[str, int]:
        """A campaign's messages by outcome; deleted ones do not count."""
        deleted = {"$eq": ["$isDeleted", True]}
        rows = self.collection.aggregate(
            [
                {"$match": {"campaignId": {"$in": id_variants(campaign_id)}}},
                {
                    "$group": {
                        "_id": {"$cond": [deleted, "deleted", {"$ifNull": ["$status", PENDING]}]},
                        "n": {"$sum": 1},
                    }
                },
            ]
        )
        by_status = {row["_id"]: row["n"] for row in rows}
        total = sum(n for status, n in by_status.items() if status != "deleted")
        return {
            "total": total,
            "sent": by_status.get(SENT, 0),
            # Unknown outcomes count as failed: delivery was never confirmed.
            "failed": by_status.get(FAILED, 0) + by_status.get(UNKNOWN, 0),
            "expired": by_status.get(EXPIRED, 0),
            "unknown": by_status.get(UNKNOWN, 0),
            "cancelled": by_status.get(CANCELLED, 0),
        }


def campaign_ids(values: Iterable[Any]) -> set[Any]:
    """Campaign references that can name a campaign; anything else is not rolled up."""
    return {v for v in values if campaign_ref(v)}


def gone(owner: str, now: datetime, since: datetime) -> Doc:
    """Claims whose poller went away: their lease lapsed, or `owner` made them before `since`
    (a tick that failed half-way: the ticks of one process never overlap). Claims it made since
    then are its own tick's, never taken back."""
    return {
        "$or": [
            {"leaseUntil": {"$lt": now}},
            {"pickedBy": owner, "pickedAt": {"$not": {"$gte": since}}},
        ]
    }


def due_before(time: datetime) -> Doc:
    """Messages due (from the later of scheduledAt and heldUntil) before `time`."""
    return {
        "scheduledAt": {"$lt": time},
        "$or": [{"heldUntil": {"$not": {"$type": "date"}}}, {"heldUntil": {"$lt": time}}],
    }


def _due_from(time: datetime) -> Doc:
    """Messages due (from the later of scheduledAt and heldUntil) at or after `time`."""
    return {"$or": [{"scheduledAt": {"$gte": time}}, {"heldUntil": {"$gte": time}}]}


def _due_key(doc: Doc) -> tuple[str, str]:
    scheduled = doc.get("scheduledAt")
    return (scheduled.isoformat() if isinstance(scheduled, datetime) else "", str(doc["_id"]))
