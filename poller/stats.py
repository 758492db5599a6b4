"""A campaign's `stats`: what its messages' outcomes add up to, kept as they change.

Each write that ends a message counts it here (`Tally.moved`), and the campaign gets one `$inc`
per tick. A full recount (`recount_pipeline`) reads the whole campaign: it runs when the poller
first works on a campaign, when the web app changed messages behind its back (marked them
done, deleted them), at completion, and now and then to repair what a crash lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from poller.contract import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINAL,
    SENT,
    UNKNOWN,
    campaign_ref,
    done_expression,
    id_variants,
)

# The outcome counts in `stats`; `failed` includes `unknown`: delivery was never confirmed.
OUTCOMES = ("sent", "failed", "expired", "unknown", "cancelled")
# The receipts counts in `stats` (delivery receipts, with EVENTS=webhook).
RECEIPTS = ("delivered", "read", "deliveryFailed")
# Acks as WAHA numbers them: 2 DEVICE (delivered), 3 READ (see store/receipts.py).
DELIVERED, READ = 2, 3


def outcome_counts(status: Any) -> dict[str, int]:
    """What one message with this status adds to `stats` (nothing unless it ended)."""
    if status not in FINAL:
        return {}
    counts = {status: 1}
    if status == UNKNOWN:
        counts[FAILED] = 1
    return counts


def complete(stats: dict[str, Any]) -> bool:
    """Whether the counts say every message of the campaign ended (unknown ones are in
    `failed`); a recount confirms."""
    ended = sum(int(stats.get(name) or 0) for name in (SENT, FAILED, EXPIRED, CANCELLED))
    return ended >= int(stats.get("total") or 0)


@dataclass
class Tally:
    """What a tick changed in each campaign's stats: `changes` by campaign (its id as text:
    an ObjectId and its hex string are one campaign), and the campaigns to recount in full."""

    changes: dict[str, Counter[str]] = field(default_factory=dict)
    ids: dict[str, Any] = field(default_factory=dict)
    recounts: set[str] = field(default_factory=set)
    # Campaigns with messages planned in the tick: those without stats yet are counted, so
    # that a campaign shows from the moment its messages are seen, not once one has ended.
    seen: set[str] = field(default_factory=set)

    def moved(self, campaign: Any, before: Any, after: Any) -> None:
        """One message of `campaign` went from status `before` to `after`."""
        key = self._key(campaign)
        if key is None:
            return
        change = self.changes.setdefault(key, Counter())
        change.update(outcome_counts(after))
        change.subtract(outcome_counts(before))

    def recount(self, campaigns: Iterable[Any]) -> None:
        """These campaigns changed in a way no count says: recount them."""
        for campaign in campaigns:
            key = self._key(campaign)
            if key is not None:
                self.recounts.add(key)

    def saw(self, campaigns: Iterable[Any]) -> None:
        """Messages of these campaigns were planned."""
        for campaign in campaigns:
            key = self._key(campaign)
            if key is not None:
                self.seen.add(key)

    def add(self, other: Tally) -> None:
        for key, change in other.changes.items():
            self.changes.setdefault(key, Counter()).update(change)
        self.ids.update(other.ids)
        self.recounts |= other.recounts
        self.seen |= other.seen

    def campaigns(self) -> dict[Any, dict[str, int]]:
        """Each campaign touched (its id as written) with its non-zero changes."""
        keys = set(self.changes) | self.recounts
        return {
            self.ids[k]: {n: v for n, v in self.changes.get(k, Counter()).items() if v}
            for k in sorted(keys)
        }

    def _key(self, campaign: Any) -> str | None:
        if not campaign_ref(campaign):
            return None
        key = str(campaign)
        self.ids.setdefault(key, campaign)
        return key


def recount_pipeline(campaign_id: Any) -> list[dict[str, Any]]:
    """The aggregation that counts a campaign's messages by what they are: deleted by the web
    app (not counted), ended (by status), sent by the web app (counted as sent), or open; with
    the receipts and the planned time of the last waiting one."""
    kind = {
        "$switch": {
            "branches": [
                {"case": done_expression("isDeleted"), "then": "deleted"},
                {"case": {"$in": [{"$ifNull": ["$status", ""]}, list(FINAL)]}, "then": "$status"},
                {"case": done_expression("isSent"), "then": SENT},
            ],
            "default": "open",
        }
    }
    return [
        {"$match": {"campaignId": {"$in": id_variants(campaign_id)}}},
        {
            "$group": {
                "_id": kind,
                "n": {"$sum": 1},
                "last": {"$max": "$plannedAt"},
                "delivered": {"$sum": {"$cond": [{"$gte": ["$ack", DELIVERED]}, 1, 0]}},
                "read": {"$sum": {"$cond": [{"$gte": ["$ack", READ]}, 1, 0]}},
                "deliveryFailed": {"$sum": {"$cond": [{"$gt": ["$deliveryError", None]}, 1, 0]}},
            }
        },
    ]


def stats_from(rows: list[dict[str, Any]]) -> tuple[dict[str, int], int, Any]:
    """`stats` from the rows of `recount_pipeline`; how many messages are open; and the planned
    time of the last open one (None when none is planned)."""
    by_kind = {row["_id"]: row for row in rows if row["_id"] != "deleted"}
    stats = {"total": sum(row["n"] for row in by_kind.values())}
    for name in OUTCOMES:
        stats[name] = 0
    for kind, row in by_kind.items():
        for name, n in outcome_counts(kind).items():
            stats[name] += n * row["n"]
    for receipt in RECEIPTS:
        stats[receipt] = sum(row[receipt] for row in by_kind.values())
    open_row = by_kind.get("open")
    return stats, open_row["n"] if open_row else 0, open_row["last"] if open_row else None
