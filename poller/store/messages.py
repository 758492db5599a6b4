"""The scheduled messages: claims as leases, outcomes, and what an operator counts. Every query
on the messages collection is built here or in `plans` (what waits, and when it goes).

`claimed` and `sending` are leases: `pickedBy` owns them until `leaseUntil`. A claimed message
keeps its `plannedAt` until it ends, so a release puts it back where it was in its lane.
"""

from __future__ import annotations

from collections.abc import Iterable
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
from poller.store.base import Doc, create_index, insert_once
from poller.timings import Timings

NOT_DONE = {"isSent": {"$nin": YES}, "isDeleted": {"$nin": YES}}
# Key patterns, hinted by pattern so an identical index the web app made under another name serves.
LEASE_INDEX = [("leaseUntil", ASCENDING)]
CAMPAIGN_INDEX = [("campaignId", ASCENDING)]
RECEIPT_INDEX = [("wahaMessageId", ASCENDING)]
# Acks as WAHA numbers them: -1 ERROR, 0 PENDING, 1 SERVER, 2 DEVICE, 3 READ, 4 PLAYED.
DELIVERED, READ, ACK_ERROR = 2, 3, -1
# A campaign's counts of its messages' receipts, in `stats`.
RECEIPTS = ("delivered", "read", "deliveryFailed")
DELIVERY_ERROR = "WhatsApp reported that it could not deliver the message (ack -1, ERROR)."
Hint = list[tuple[str, int]]
# Fields a claim's outcome removes: it no longer waits, nor holds a lease.
ENDED = {"leaseUntil": "", "retryAt": "", "inDoubt": "", "heldUntil": "", "plannedAt": ""}


class Messages:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner

    def ensure_indexes(self) -> None:
        """The indexes of the lease sweep and the rollup (`plans` makes those of the plan)."""
        create_index(self.collection, LEASE_INDEX, "poller_lease", sparse=True)
        create_index(self.collection, CAMPAIGN_INDEX, "poller_campaign", sparse=True)
        create_index(self.collection, RECEIPT_INDEX, "poller_receipt", sparse=True)

    def insert(self, docs: list[Doc]) -> int:
        """Write new messages (a recurring schedule's occurrence), each at most once: an `_id`
        that exists already is left as it is. Returns how many were new."""
        return sum(
            insert_once(self.collection, docs[i : i + 1000]) for i in range(0, len(docs), 1000)
        )

    def acknowledge(self, waha_message_id: str, ack: int, at: datetime) -> Doc | None:
        """Record a delivery receipt on the message WAHA knows as `waha_message_id`: `ack`
        only ever rises; `deliveredAt` and `readAt` are the first times it reached 2 and 3; an
        ack of -1 notes `deliveryError` (its status stays `sent`). Any order, any repeat, the
        same result. The message (its `campaignId`), or None when no message has that id."""
        fields: Doc = {"ack": {"$max": ["$ack", ack]}}
        if ack >= DELIVERED:
            fields["deliveredAt"] = {"$ifNull": ["$deliveredAt", at]}
        if ack >= READ:
            fields["readAt"] = {"$ifNull": ["$readAt", at]}
        if ack == ACK_ERROR:
            fields["deliveryError"] = {"$ifNull": ["$deliveryError", DELIVERY_ERROR]}
        return self.collection.find_one_and_update(
            {"wahaMessageId": waha_message_id},
            [{"$set": fields}],
            {"campaignId": 1},
            hint=RECEIPT_INDEX,
        )

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

    def lapsed(self, now: datetime, since: datetime, limit: int) -> list[Doc]:
        """Claims whose poller went away, to take over (at most `limit`), in lease order."""
        query = self.taken_over(now, since)
        fields = {"session": 1, "sessionId": 1}
        return list(self.collection.find(query, fields, hint=LEASE_INDEX, limit=limit))

    def take_over(self, ids: list[Any], now: datetime, since: datetime) -> list[Doc]:
        """Take over these claims (of `lapsed`), where they are still lapsed."""
        return self._take(self.taken_over(now, since), ids, now)

    def take(self, ids: list[Any], now: datetime) -> list[Doc]:
        """Claim these waiting messages; those another poller claimed first are not returned.

        Each document is taken by one conditional update, so of two pollers racing for it
        exactly one wins; the other's update simply does not match.
        """
        query = {"isPicked": {"$ne": True}, "plannedAt": {"$exists": True}, **NOT_DONE}
        return self._take(query, ids, now)

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
        return sorted(self.collection.find(mine), key=lambda d: ids.index(d["_id"]))

    def extend(self, message_ids: Iterable[Any], until: datetime) -> None:
        """Renew the lease on claims this poller still holds."""
        self.collection.update_many(
            {"_id": {"$in": list(message_ids)}, "pickedBy": self.owner, "status": CLAIMED},
            {"$set": {"leaseUntil": until}},
        )

    # -- one message's life ---------------------------------------------------------------------

    def start_sending(
        self, message_id: Any, now: datetime, server: str, send_id: str | None = None
    ) -> bool:
        """Mark a claimed message as in flight through WAHA `server`, with the WAHA message id
        it will be sent under (kept for every retry); False when it is no longer ours, or was
        deleted."""
        fields: Doc = {
            "status": SENDING,
            "leaseUntil": now + self.timings.send_lease,
            "wahaServer": server,
        }
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
                "$unset": ENDED,
            },
        )
        return result.modified_count == 1

    def finish(self, message_id: Any, status: str, reason: str, now: datetime) -> None:
        """End a message this poller holds as `failed`, `unknown` or `cancelled`, with why."""
        self.collection.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {
                "$set": {"status": status, "finishedAt": now, "lastError": reason},
                "$unset": {k: v for k, v in ENDED.items() if k != "inDoubt"},
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
        unplan: bool = False,
    ) -> int:
        """Give claims back: they wait in their lanes again, as planned (and not before
        `retry_at`, when given). `in_doubt`: the last attempt may have reached WhatsApp (it
        timed out). `unplan`: they wait with no plan (their campaign was paused)."""
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
        unset = {"pickedBy": "", "leaseUntil": "", **({"plannedAt": ""} if unplan else {})}
        result = self.collection.update_many(
            {"_id": {"$in": ids}, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {"$set": fields, "$unset": unset},
        )
        return result.modified_count

    # -- what an operator sees ------------------------------------------------------------------

    def in_progress(self) -> int:
        return self.collection.count_documents({"status": {"$in": [CLAIMED, SENDING]}})

    def outcomes_since(self, since: datetime) -> dict[str, int]:
        """How many messages ended in each final status since `since`."""
        ended = {"$or": [{"sentAt": {"$gte": since}}, {"finishedAt": {"$gte": since}}]}
        rows = self.collection.aggregate(
            [{"$match": ended}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        )
        by_status = {row["_id"]: row["n"] for row in rows}
        return {status: by_status.get(status, 0) for status in FINAL}

    def receipts_since(self, since: datetime) -> dict[str, int]:
        """How many messages were delivered, and read, since `since` (their receipts)."""
        return {
            "delivered": self.collection.count_documents({"deliveredAt": {"$gte": since}}),
            "read": self.collection.count_documents({"readAt": {"$gte": since}}),
        }

    def campaign_stats(self, campaign_id: Any) -> tuple[dict[str, int], datetime | None]:
        """A campaign's messages by outcome (deleted ones do not count), and the planned time
        of its last waiting message: when it should be done."""
        deleted = {"$eq": ["$isDeleted", True]}
        rows = list(
            self.collection.aggregate(
                [
                    {"$match": {"campaignId": {"$in": id_variants(campaign_id)}}},
                    {
                        "$group": {
                            "_id": {
                                "$cond": [deleted, "deleted", {"$ifNull": ["$status", PENDING]}]
                            },
                            "n": {"$sum": 1},
                            "last": {"$max": "$plannedAt"},
                            "delivered": {"$sum": {"$cond": [{"$gte": ["$ack", DELIVERED]}, 1, 0]}},
                            "read": {"$sum": {"$cond": [{"$gte": ["$ack", READ]}, 1, 0]}},
                            "deliveryFailed": {
                                "$sum": {"$cond": [{"$gt": ["$deliveryError", None]}, 1, 0]}
                            },
                        }
                    },
                ]
            )
        )
        by_status = {row["_id"]: row["n"] for row in rows}
        total = sum(n for status, n in by_status.items() if status != "deleted")
        planned = [
            row["last"]
            for row in rows
            if row["_id"] not in (*FINAL, "deleted") and isinstance(row["last"], datetime)
        ]
        stats = {
            "total": total,
            "sent": by_status.get(SENT, 0),
            # Unknown outcomes count as failed: delivery was never confirmed.
            "failed": by_status.get(FAILED, 0) + by_status.get(UNKNOWN, 0),
            "expired": by_status.get(EXPIRED, 0),
            "unknown": by_status.get(UNKNOWN, 0),
            "cancelled": by_status.get(CANCELLED, 0),
        }
        for receipt in RECEIPTS:
            stats[receipt] = sum(row[receipt] for row in rows if row["_id"] != "deleted")
        return stats, max(planned, default=None)


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
    """Messages due before `time`: planned before it, or (not planned) scheduled before it and
    not held by the previous version until after it."""
    return {
        "$or": [
            {"plannedAt": {"$lt": time}},
            {
                "plannedAt": {"$exists": False},
                "scheduledAt": {"$lt": time},
                "heldUntil": {"$not": {"$gte": time}},
            },
        ]
    }


def _due_from(time: datetime) -> Doc:
    """Messages due at or after `time` (the opposite of `due_before`)."""
    return {
        "$or": [
            {"plannedAt": {"$gte": time}},
            {
                "plannedAt": {"$exists": False},
                "$or": [{"scheduledAt": {"$gte": time}}, {"heldUntil": {"$gte": time}}],
            },
        ]
    }
