"""Every write that moves a message from one state to the next: the one home of a message's life.

    new ──plan──> waiting ──claim──> claimed ──start──> sending ──> sent | failed | unknown
                    ^                   │                  │
                    └──── release ──────┘ (retry, a turn)  └─ its poller went away: taken
                                                              over, or unknown
    new, or waiting, past its deadline ──> expired (unknown, where it may have reached WhatsApp)
    waiting when its campaign is cancelled ──> cancelled;  marked done by the web app ──> retired

A message waits with a `lane` (its WhatsApp session) and a `plannedAt`, and its deadline is
`plannedAt` plus the lookback window: it is never claimed nor sent after it. Pause and opt-outs
are filters where messages are read and sent, not states: a paused message keeps its place.

Each write is guarded: a claim re-checks its condition inside the update, and every later step
matches its owner (`pickedBy`), so of two pollers exactly one moves a message. Each write that
ends a message counts it in `stats` (a `Tally`), which the campaigns roll up with one `$inc`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from loguru import logger
from pymongo import ASCENDING, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, WriteError

from poller.contract import (
    CLAIMED,
    NOT_DONE,
    PENDING,
    RETRY,
    SENDING,
    SENT,
    UNKNOWN,
    campaign_ref,
    done,
    message_key,
)
from poller.stats import Tally
from poller.store.base import Doc, create_index, insert_once
from poller.timings import Timings

# Key patterns, hinted by pattern so an identical index the web app made under another name serves.
ID_INDEX = [("_id", ASCENDING)]
LEASE_INDEX = [("leaseUntil", ASCENDING)]
CAMPAIGN_INDEX = [("campaignId", ASCENDING), ("isPicked", ASCENDING), ("plannedAt", ASCENDING)]
# The most messages one write ends: each write stays well inside MONGODB_TIMEOUT_SECONDS.
SETTLE_CHUNK = 200
# Fields an outcome removes: the message no longer waits, nor holds a lease.
ENDED = ["leaseUntil", "retryAt", "heldUntil", "plannedAt"]
UNPICKED = {"isPicked": {"$ne": True}}


class Messages:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner
        # Messages MongoDB refused to settle (a validator): not tried again by this process.
        self.refused: set[Any] = set()

    def ensure_indexes(self) -> None:
        """The indexes of leases and campaigns (`plans` makes those of the plan, `receipts`
        those of receipts)."""
        create_index(self.collection, LEASE_INDEX, "poller_lease", sparse=True)
        create_index(self.collection, CAMPAIGN_INDEX, "poller_campaign_queue")

    def insert(self, docs: list[Doc]) -> int:
        """Write new messages (a recurring schedule's occurrence), each at most once: an `_id`
        that exists already is left as it is. Returns how many were new."""
        return sum(
            insert_once(self.collection, docs[i : i + 1000]) for i in range(0, len(docs), 1000)
        )

    # -- planned ---------------------------------------------------------------------------------

    def plan(self, rows: Iterable[tuple[Any, Doc]]) -> int:
        """Put new messages in their lanes: (id, {lane, priority, plannedAt, lastError?}). A
        message another poller planned first keeps that plan. How many this poller planned."""
        ops = [UpdateOne({"_id": i, "lane": None, **UNPICKED}, {"$set": f}) for i, f in rows]
        return self._bulk(ops, "planned")

    def replan(self, times: Iterable[tuple[Any, datetime]], reason: str | None = None) -> int:
        """Plan waiting messages again: (id, new plannedAt); `reason` goes into lastError."""
        ops = []
        for message_id, at in times:
            fields: Doc = {"plannedAt": at}
            if reason is not None:
                fields["lastError"] = reason
            ops.append(
                UpdateOne({"_id": message_id, "lane": {"$ne": None}, **UNPICKED}, {"$set": fields})
            )
        return self._bulk(ops, "planned again")

    def note(self, ids: list[Any], reason: str) -> None:
        """Say in lastError why these waiting messages wait (once per reason)."""
        self._update(
            ids, {**UNPICKED, "lastError": {"$ne": reason}}, {"$set": {"lastError": reason}}
        )

    def forget(self, message_ids: list[Any]) -> None:
        """Unplan messages the web app rescheduled to later: planned again once due."""
        self._update(message_ids, UNPICKED, {"$unset": {"plannedAt": "", "lane": ""}})

    def retire(self, docs: list[Doc], tally: Tally) -> None:
        """Take messages the web app marked sent or deleted out of the queue (`isPicked`); their
        campaigns are recounted, since what the web app did is not a transition of ours."""
        ids = [d["_id"] for d in docs if done(d)]
        if not ids:
            return
        self._update(
            ids, UNPICKED, {"$set": {"isPicked": True}, "$unset": dict.fromkeys(ENDED, "")}
        )
        tally.recount(d.get("campaignId") for d in docs)

    # -- claimed ---------------------------------------------------------------------------------

    def claim(self, ids: list[Any], now: datetime) -> list[Doc]:
        """Claim these waiting messages while they are still before their deadline; those
        another poller claimed first, or the web app marked done meanwhile, are not returned.

        Each document is taken by one conditional update, so of two pollers racing for it
        exactly one wins; the other's update simply does not match.
        """
        query = {**UNPICKED, **in_time(now - self.timings.lookback), **NOT_DONE}
        return self._take(query, ids, now)

    def take_over(self, ids: list[Any], now: datetime, since: datetime) -> list[Doc]:
        """Take over claims whose poller went away (`gone`) while before their deadline. A send
        in flight is taken over only under its pre-generated WAHA message id: sent again under
        the same id, WAHA delivers it at most once."""
        query = {
            "$and": [
                gone(self.owner, now, since),
                {"$or": [{"status": CLAIMED}, {"status": SENDING, "sendId": {"$type": "string"}}]},
            ],
            **in_time(now - self.timings.lookback),
            **NOT_DONE,
        }
        return self._take(query, ids, now)

    def _take(self, query: Doc, ids: list[Any], now: datetime) -> list[Doc]:
        if not ids:
            return []
        self._update(
            ids,
            query,
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
        order = {message_id: n for n, message_id in enumerate(ids)}
        found = self.collection.find(mine, hint=ID_INDEX)  # by id, whatever the other fields
        return sorted(found, key=lambda d: order[d["_id"]])

    def extend(self, message_ids: Iterable[Any], until: datetime) -> None:
        """Renew the lease on claims this poller still holds."""
        mine = {"pickedBy": self.owner, "status": CLAIMED}
        self._update(list(message_ids), mine, {"$set": {"leaseUntil": until}})

    def release(
        self,
        message_ids: Iterable[Any],
        reason: str | None = None,
        retry_at: datetime | None = None,
        in_doubt: bool = False,
    ) -> int:
        """Give claims back: they wait in their lanes again, as planned (and not before
        `retry_at`, when given). `in_doubt`: the last attempt may have reached WhatsApp (it
        timed out)."""
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
        mine = {"pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}}
        return self._update(
            ids, mine, {"$set": fields, "$unset": {"pickedBy": "", "leaseUntil": ""}}
        )

    def give_back(self, ids: list[Any], now: datetime, since: datetime) -> int:
        """Put claims whose poller went away back to wait, as planned (their campaign is
        paused, or their session cannot send now)."""
        return self._update(
            ids,
            {"status": CLAIMED, **gone(self.owner, now, since)},
            {
                "$set": {"isPicked": False, "status": PENDING},
                "$unset": {"pickedBy": "", "leaseUntil": ""},
            },
        )

    # -- sending, and its outcome ---------------------------------------------------------------

    def start_sending(
        self, message_id: Any, now: datetime, server: str, send_id: str | None = None
    ) -> bool:
        """Mark a claimed message as in flight through WAHA `server`, with the WAHA message id
        it will be sent under (kept for every retry); False when it is no longer ours, was
        marked done, or is past its deadline: it is then not sent."""
        fields: Doc = {
            "status": SENDING,
            "leaseUntil": now + self.timings.send_lease,
            "wahaServer": server,
        }
        if send_id:
            fields["sendId"] = send_id
        result = self.collection.update_one(
            {
                "_id": message_id,
                "pickedBy": self.owner,
                "status": CLAIMED,
                **in_time(now - self.timings.lookback),
                **NOT_DONE,
            },
            {"$set": fields, "$inc": {"attempts": 1}},
        )
        return result.modified_count == 1

    def sent(
        self,
        message_id: Any,
        waha_message_id: str | None,
        now: datetime,
        tally: Tally,
        slot: datetime | None = None,
    ) -> bool:
        """Record that WAHA accepted the message, and the planned time (`slot`) it was sent
        against. `unknown` too: a slow send that another poller gave up on did go out after
        all."""
        fields = {
            "status": SENT,
            "isSent": True,
            "sentAt": now,
            # Its plannedAt, which ends with it: how late it went out against its plan.
            "slotAt": slot,
            "wahaMessageId": waha_message_id,
            # What every engine's acks name it by (see store/receipts.py).
            "wahaKeyId": message_key(waha_message_id) if waha_message_id else None,
            "lastError": None,
        }
        held = {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [SENDING, UNKNOWN]}}
        update = {"$set": fields, "$unset": {f: "" for f in [*ENDED, "inDoubt"]}}
        return self._end_one(held, update, SENT, tally)

    def finish(
        self, message_id: Any, status: str, reason: str, now: datetime, tally: Tally
    ) -> bool:
        """End a message this poller holds as `failed`, `unknown` or `cancelled`, with why."""
        held = {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}}
        update = {
            "$set": {"status": status, "finishedAt": now, "lastError": reason},
            "$unset": {f: "" for f in ENDED},
        }
        return self._end_one(held, update, status, tally)

    def _end_one(self, query: Doc, update: Doc, status: str, tally: Tally) -> bool:
        """End one message as `status` where `query` holds, counted from the status it had."""
        before = self.collection.find_one_and_update(
            query, update, {"status": 1, "campaignId": 1}, return_document=ReturnDocument.BEFORE
        )
        if before is None:
            return False
        tally.moved(before.get("campaignId"), before.get("status"), status)
        return True

    def status_of(self, message_id: Any) -> Any:
        return (self.collection.find_one({"_id": message_id}, {"status": 1}) or {}).get("status")

    # -- settled in bulk -------------------------------------------------------------------------

    def end(
        self,
        docs: list[Doc],
        where: Doc,
        outcome: tuple[str, str | Doc],
        now: datetime,
        tally: Tally,
    ) -> int:
        """End these messages (read by the caller) as `outcome` (status, reason), where they
        still match `where`: one write per campaign, so that each campaign's count is exact.
        The reason keeps what the message waited for, or its last attempt's error, after it.
        A document MongoDB refuses to change (a validator) is ended alone, or logged."""
        by_campaign: dict[str, list[Doc]] = {}
        for doc in docs:
            if doc["_id"] not in self.refused:
                by_campaign.setdefault(_key(doc.get("campaignId")), []).append(doc)
        status, reason = outcome
        ended = 0
        chunks = [
            group[i : i + SETTLE_CHUNK]
            for group in by_campaign.values()
            for i in range(0, len(group), SETTLE_CHUNK)
        ]
        for group in chunks:
            ids = [d["_id"] for d in group]
            try:
                n = self._end({"_id": {"$in": ids}, **where}, status, reason, now)
            except WriteError:  # some of the group may be written: count what is
                for message_id in ids:
                    self._end_alone(message_id, where, status, reason, now)
                ended_now = {"_id": {"$in": ids}, "status": status, "finishedAt": now}
                n = self.collection.count_documents(ended_now)
            ended += n
            campaign = group[0].get("campaignId")
            for _ in range(n):
                tally.moved(campaign, None, status)
        return ended

    def _end_alone(
        self, message_id: Any, where: Doc, status: str, reason: str | Doc, now: datetime
    ) -> int:
        try:
            return self._end({"_id": message_id, **where}, status, reason, now)
        except WriteError as exc:  # passed over from now on by this process, logged once
            self._refuse(message_id, exc)
            return 0

    def _end(self, query: Doc, status: str, reason: str | Doc, now: datetime) -> int:
        attempted = {"$gt": [{"$ifNull": ["$attempts", 0]}, 0]}
        said = {"$cond": [attempted, " Last attempt: ", " It was waiting: "]}
        last = {"$concat": [reason, said, {"$toString": "$lastError"}]}
        result = self.collection.update_many(
            query,
            [
                {
                    "$set": {
                        "isPicked": True,
                        "status": status,
                        "finishedAt": now,
                        "lastError": {
                            "$cond": [{"$eq": [{"$type": "$lastError"}, "string"]}, last, reason]
                        },
                    }
                },
                {"$unset": ENDED},
            ],
        )
        return result.modified_count

    def _update(self, ids: list[Any], query: Doc, update: Any) -> int:
        """Update these messages where `query` still holds; how many changed. Where MongoDB
        refuses one of them (a field of the wrong type, a validator), each is written alone: the
        refused ones are left as they are, and passed over by this process from then on."""
        ids = [i for i in ids if i not in self.refused]
        if not ids:
            return 0
        try:
            return self.collection.update_many(
                {"_id": {"$in": ids}, **query}, update
            ).modified_count
        except WriteError:
            changed = 0
            for message_id in ids:
                try:
                    changed += self.collection.update_one(
                        {"_id": message_id, **query}, update
                    ).modified_count
                except WriteError as exc:
                    self._refuse(message_id, exc)
            return changed

    def _refuse(self, message_id: Any, exc: WriteError) -> None:
        self.refused.add(message_id)
        logger.error(
            "message {}: MongoDB refused to update it ({}); it is left as it is",
            message_id,
            str(exc)[:200],
        )

    def _bulk(self, ops: list[UpdateOne], what: str) -> int:
        if not ops:
            return 0
        try:
            return self.collection.bulk_write(ops, ordered=False).modified_count
        except BulkWriteError as exc:  # a document MongoDB refuses to change: the rest goes on
            errors = exc.details.get("writeErrors", [])
            logger.error("{} message(s) could not be {}: {}", len(errors), what, str(exc)[:300])
            return int(exc.details.get("nModified", 0))


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


def deadline(doc: Doc) -> datetime | None:
    """When the lookback window of a message starts: its plannedAt, or, for a message not
    planned (claimed by an earlier version), its scheduledAt. It is never claimed nor sent
    more than the lookback window after this."""
    for name in ("plannedAt", "scheduledAt"):
        if isinstance(doc.get(name), datetime):
            at: datetime = doc[name]
            return at
    return None


def in_time(cutoff: datetime) -> Doc:
    """`deadline(doc) >= cutoff` as a query (cutoff: now less the lookback window)."""
    return {
        "$or": [
            {"plannedAt": {"$gte": cutoff}},
            {"plannedAt": {"$exists": False}, "scheduledAt": {"$gte": cutoff}},
        ]
    }


def _key(campaign: Any) -> str:
    return str(campaign) if campaign_ref(campaign) else ""
