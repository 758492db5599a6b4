"""Settling what can no longer be sent, with why: messages past their deadline, claims whose
poller went away, sends in doubt, undated messages, and the waiting messages of a cancelled
campaign. The reads are the tick's; each write re-checks what made a message settle.

A message that may have reached WhatsApp already (`inDoubt`, or a send in flight that cannot be
taken over) ends `unknown`, never `expired` or `cancelled`: "not sent" would invite a resend.
"""

from __future__ import annotations

from datetime import datetime

from loguru import logger

from poller.contract import (
    CANCELLED,
    CLAIMED,
    EXPIRED,
    FAILED,
    NOT_DONE,
    SENDING,
    UNKNOWN,
    show,
)
from poller.counts import TickCounts
from poller.store import Doc, Store
from poller.store.messages import SETTLE_CHUNK, UNPICKED, gone, in_time

# The most messages of a backlog (a cancelled campaign's, or late ones) settled at once.
CHUNK = SETTLE_CHUNK
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
ABANDONED = "Not sent: the poller that claimed it stopped, and no poller took it over in time."
NO_DATE = {
    "$concat": [
        "Not sent: scheduledAt must be a date, but it is ",
        {"$type": "$scheduledAt"},
        ", so the poller cannot tell when to send it.",
    ]
}


def window(store: Store) -> int:
    return int(store.timings.lookback.total_seconds())


def too_late_new(store: Store, docs: list[Doc], now: datetime, counts: TickCounts) -> None:
    """Messages first seen more than the lookback window past their scheduledAt: expired."""
    cutoff = now - store.timings.lookback
    reason = (
        f"Not sent: it was more than {window(store)} s past its scheduled time when the poller "
        "could send it."
    )
    where = {"lane": None, **UNPICKED, "scheduledAt": {"$lt": cutoff}, **NOT_DONE}
    _end(store, docs, where, (EXPIRED, reason), now, counts)


def behind(store: Store, docs: list[Doc], now: datetime, counts: TickCounts) -> None:
    """Waiting messages past their deadline (planned more than the lookback window ago)."""
    cutoff = now - store.timings.lookback
    reason = (
        f"Not sent: it was more than {window(store)} s past its planned time when the poller "
        "could send it."
    )
    # Not one the web app moved to later meanwhile: that one is planned again once due.
    where = {**UNPICKED, "plannedAt": {"$lt": cutoff}, "scheduledAt": {"$not": {"$gt": now}}}
    where.update(NOT_DONE)
    _end(store, docs, where, (EXPIRED, reason), now, counts)


def undated(store: Store, docs: list[Doc], now: datetime, counts: TickCounts) -> None:
    """Messages whose scheduledAt is not a date: failed, each with its log line."""
    where = {"lane": None, **UNPICKED, "scheduledAt": {"$not": {"$type": "date"}}, **NOT_DONE}
    counts.failed += store.messages.end(docs, where, (FAILED, NO_DATE), now, counts.stats)
    for doc in docs:
        logger.warning(
            "message {} failed: scheduledAt must be a date, but it is {}",
            doc["_id"],
            show(doc.get("scheduledAt")),
        )


def abandoned(
    store: Store, docs: list[Doc], now: datetime, since: datetime, counts: TickCounts
) -> None:
    """Claims whose poller went away that cannot be taken over: a claim past its deadline
    expires; a send in flight without a WAHA message id, or past its deadline, is unknown."""
    cutoff = now - store.timings.lookback
    lapsed = gone(store.owner, now, since)
    claimed = [d for d in docs if d.get("status") == CLAIMED]
    sending = [d for d in docs if d.get("status") == SENDING]
    late = {**lapsed, "status": CLAIMED, "$nor": in_time(cutoff)["$or"]}
    _end(store, claimed, late, (EXPIRED, ABANDONED), now, counts)
    in_flight = {**lapsed, "status": SENDING}
    counts.unknown += store.messages.end(
        sending, in_flight, (UNKNOWN, UNKNOWN_REASON), now, counts.stats
    )


def cancel(store: Store, docs: list[Doc], now: datetime, counts: TickCounts) -> None:
    """Waiting messages of a cancelled campaign: cancelled."""
    where = {**UNPICKED, **NOT_DONE}
    _end(store, docs, where, (CANCELLED, CANCELLED_REASON), now, counts, CANCELLED_DOUBT)


def _end(
    store: Store,
    docs: list[Doc],
    where: Doc,
    sure: tuple[str, str],
    now: datetime,
    counts: TickCounts,
    doubt: str = DOUBT_REASON,
) -> None:
    """End `docs` as `sure`, or as unknown (`doubt`) where an earlier attempt may have reached
    WhatsApp (`inDoubt`)."""
    in_doubt = [d for d in docs if d.get("inDoubt") is True]
    rest = [d for d in docs if d.get("inDoubt") is not True]
    status, _ = sure
    n = store.messages.end(rest, {**where, "inDoubt": {"$ne": True}}, sure, now, counts.stats)
    setattr(counts, status, getattr(counts, status) + n)
    counts.unknown += store.messages.end(
        in_doubt, {**where, "inDoubt": True}, (UNKNOWN, doubt), now, counts.stats
    )
