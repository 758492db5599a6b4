"""Settling what can no longer be sent: messages too late, claims whose poller went away, sends
in doubt, undated messages, and the unsent messages of a cancelled campaign. A chunk at a time,
each chunk one read and one write per outcome."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo.collection import Collection

from poller.contract import (
    CANCELLED,
    CLAIMED,
    EXPIRED,
    FAILED,
    FINAL,
    SENDING,
    UNKNOWN,
    id_variants,
)
from poller.store.base import Doc
from poller.store.messages import CAMPAIGN_INDEX, LEASE_INDEX, NOT_DONE, Hint, due_before, gone
from poller.store.plans import NEW_INDEX, PLAN_INDEX
from poller.timings import Timings

# The most documents one write settles: a backlog of thousands is settled a chunk at a time,
# each well inside MONGODB_TIMEOUT_SECONDS, and what is settled stays settled.
SETTLE_CHUNK = 200
UNKNOWN_REASON = (
    "The poller stopped while this message was being sent, so it may or may not have been "
    "delivered. It was not sent again, to avoid a duplicate: check the chat before resending."
)
DOUBT_REASON = (
    "Not sent again: an earlier attempt may have reached WhatsApp, and the message is now too "
    "late to try once more. Check the chat before resending."
)
CANCELLED_REASON = "Not sent: its campaign was cancelled."
CANCELLED_DOUBT = (
    "Not sent again: its campaign was cancelled, but an earlier attempt may have reached "
    "WhatsApp. Check the chat before resending."
)


@dataclass
class Settled:
    """What a sweep ended, by outcome; `more` when it stopped at its budget."""

    expired: int = 0
    unknown: int = 0
    failed: int = 0
    cancelled: int = 0
    campaigns: list[Any] = field(default_factory=list)  # each settled message's campaignId
    more: bool = False


class Sweeper:
    def __init__(self, collection: Collection[Doc], timings: Timings, owner: str) -> None:
        self.collection = collection
        self.timings = timings
        self.owner = owner

    def sweep(
        self,
        now: datetime,
        since: datetime,
        budget: int = SETTLE_CHUNK,
        lanes: Iterable[str] = (),
    ) -> Settled:
        """Expire what is too late to send, and settle claims whose poller went away; at most
        `budget` messages (`more` says whether some are left for the next call).

        Too late: a message first seen more than the lookback window after it was due, or one
        in `lanes` (the lanes that have such messages) planned more than that window ago.

        A message that may have reached WhatsApp already (`inDoubt`, or a send in flight that
        cannot be taken over) ends `unknown`, never `expired`: "not sent" would invite a resend.
        """
        settled = Settled()
        window = int(self.timings.lookback.total_seconds())
        cutoff = now - self.timings.lookback
        base = {"isPicked": {"$ne": True}, **NOT_DONE}
        late = {
            **base,
            "lane": None,
            "scheduledAt": {"$lt": cutoff},
            "heldUntil": {"$not": {"$gte": cutoff}},
        }
        lapsed = {
            "status": CLAIMED,
            "leaseUntil": {"$lt": now},
            **due_before(now - self.timings.takeover_limit),
        }
        too_late = (
            f"Not sent: it was more than {window} s past its scheduled time when the poller "
            "could send it."
        )
        behind = (
            f"Not sent: it was more than {window} s past its planned time when the poller "
            "could send it."
        )
        abandoned = (
            "Not sent: the poller that claimed it stopped, and no poller took it over in time."
        )
        # A send in flight when its poller stopped (or its tick failed) that cannot be taken over.
        in_flight = {
            "status": SENDING,
            "$and": [
                gone(self.owner, now, since),
                {
                    "$or": [
                        {"sendId": {"$not": {"$type": "string"}}},
                        due_before(now - self.timings.takeover_limit),
                    ]
                },
            ],
        }
        undated = {
            "lane": None,
            "isPicked": {"$ne": True},
            "scheduledAt": {"$not": {"$type": "date"}},
            **NOT_DONE,
        }
        no_date = {
            "$concat": [
                "Not sent: scheduledAt must be a date, but it is ",
                {"$type": "$scheduledAt"},
                ", so the poller cannot tell when to send it.",
            ]
        }
        doubt = (UNKNOWN, DOUBT_REASON)  # an earlier attempt may have reached WhatsApp
        # Not one the web app moved to later since it was planned: planned again once due.
        not_moved = {"scheduledAt": {"$not": {"$gt": now}}}
        stale: list[tuple[Doc, Hint, tuple[str, str | Doc], tuple[str, str] | None]] = [
            (
                {**base, "lane": lane, "plannedAt": {"$lt": cutoff}, **not_moved},
                PLAN_INDEX,
                (EXPIRED, behind),
                doubt,
            )
            for lane in lanes
        ]
        for query, hint, sure, in_doubt in (
            (late, NEW_INDEX, (EXPIRED, too_late), doubt),
            *stale,
            (lapsed, LEASE_INDEX, (EXPIRED, abandoned), doubt),
            (in_flight, LEASE_INDEX, (UNKNOWN, UNKNOWN_REASON), None),
            (undated, NEW_INDEX, (FAILED, no_date), None),
        ):
            self._settle(query, hint, now, settled, budget, sure, in_doubt)
            if settled.more:
                break
        return settled

    def cancel_unsent(
        self, campaign_id: Any, now: datetime, settled: Settled, budget: int = SETTLE_CHUNK
    ) -> None:
        """End `cancelled` every message of a cancelled campaign not yet being sent (`unknown`
        where an earlier attempt may have reached WhatsApp), up to `budget` in all."""
        unsent: Doc = {
            "campaignId": {"$in": id_variants(campaign_id)},
            "status": {"$nin": [SENDING, *FINAL]},
            **NOT_DONE,
        }
        self._settle(
            unsent,
            CAMPAIGN_INDEX,
            now,
            settled,
            budget,
            (CANCELLED, CANCELLED_REASON),
            (UNKNOWN, CANCELLED_DOUBT),
        )

    def _settle(
        self,
        query: Doc,
        hint: Hint,
        now: datetime,
        settled: Settled,
        budget: int,
        sure: tuple[str, str | Doc],
        in_doubt: tuple[str, str] | None,
    ) -> None:
        """End what `query` matches, a chunk at a time, until `settled` holds `budget` messages
        (then `more` is set): as `sure`, or as `in_doubt` where an earlier attempt may have
        reached WhatsApp (`inDoubt`). One read per chunk serves both."""
        while True:
            room = budget - _total(settled)
            if room <= 0:
                settled.more = True
                return
            fields = {"campaignId": 1, "inDoubt": 1}
            found = list(self.collection.find(query, fields, hint=hint).limit(room))
            if not found:
                return
            doubt = [d["_id"] for d in found if in_doubt and d.get("inDoubt") is True]
            rest = [d["_id"] for d in found if d["_id"] not in doubt]
            for ids, outcome, flag in (
                (rest, sure, {"$ne": True} if in_doubt else None),
                (doubt, in_doubt, True),
            ):
                if not ids or outcome is None:
                    continue
                which = {"_id": {"$in": ids}, **query}
                if flag is not None:
                    which["inDoubt"] = flag
                status, reason = outcome
                done = self._end(which, status, reason, now)
                setattr(settled, status, getattr(settled, status) + done)
            settled.campaigns += [d.get("campaignId") for d in found]
            if len(found) < room:
                return

    def _end(self, query: Doc, status: str, reason: str | Doc, now: datetime) -> int:
        """End what `query` matches as `status`, keeping what the message waited for or its
        last attempt's error after the reason: usually why it could not be sent in time."""
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
                {"$unset": ["leaseUntil", "retryAt", "heldUntil", "plannedAt"]},
            ],
        )
        return result.modified_count


def _total(settled: Settled) -> int:
    return settled.expired + settled.unknown + settled.failed + settled.cancelled
