"""The messages' last hours as the dashboard shows them: outcomes per minute, how late the sent
ones went out, and the latest that ended without being sent."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import DESCENDING
from pymongo.collection import Collection

from poller.contract import EXPIRED, FAILED, SENT, UNKNOWN, id_variants
from poller.store.base import Doc
from poller.store.plans import ENDED_INDEX

# The ends of a message that was not sent, which the dashboard lists with their reasons.
NOT_SENT = (FAILED, EXPIRED, UNKNOWN)
# Lateness buckets (sentAt - scheduledAt), by their lower bound in seconds.
LATENESS_FROM = (0, 1, 5, 30, 60, 120)


class Activity:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def per_minute(self, since: datetime) -> list[Doc]:
        """How many messages ended in each status in each minute since `since`:
        `{"minute": "2026-11-29T10:15", "status": "sent", "n": 3}`, in UTC."""
        ended = {"$or": [{"sentAt": {"$gte": since}}, {"finishedAt": {"$gte": since}}]}
        at = {"$ifNull": ["$sentAt", "$finishedAt"]}
        minute = {"$dateToString": {"format": "%Y-%m-%dT%H:%M", "date": at}}
        rows = self.collection.aggregate(
            [
                {"$match": ended},
                {"$group": {"_id": {"minute": minute, "status": "$status"}, "n": {"$sum": 1}}},
            ]
        )
        found = [{**row["_id"], "n": row["n"]} for row in rows]
        return sorted(found, key=lambda row: (str(row["minute"]), str(row["status"])))

    def lateness(self, since: datetime) -> list[Doc]:
        """The messages sent since `since` by how late they went out: `{"from": 5, "n": 12}`
        counts those 5 s or more, and less than the next bucket's `from`, late."""
        # Each bucket's lower bound in ms; the first takes in early sends (a clock ahead) too.
        lower = [-(10**15), *(1000 * s for s in LATENESS_FROM[1:])]
        rows = self.collection.aggregate(
            [
                {
                    "$match": {
                        "sentAt": {"$gte": since},
                        "status": SENT,
                        "scheduledAt": {"$type": "date"},
                    }
                },
                {
                    "$bucket": {
                        "groupBy": {"$subtract": ["$sentAt", "$scheduledAt"]},
                        "boundaries": [*lower, 10**15],
                        "output": {"n": {"$sum": 1}},
                    }
                },
            ]
        )
        counts = {row["_id"]: row["n"] for row in rows}
        return [
            {"from": s, "n": counts.get(k, 0)} for s, k in zip(LATENESS_FROM, lower, strict=True)
        ]

    def not_sent(
        self, limit: int = 50, chat_id: str | None = None, campaign: str | None = None
    ) -> list[Doc]:
        """The latest messages that ended failed, expired or unknown, newest first, with their
        reasons; only one chat's, or one campaign's, when given."""
        query: dict[str, Any] = {"status": {"$in": list(NOT_SENT)}}
        if chat_id:
            query["chatId"] = chat_id
        if campaign:
            query["campaignId"] = {"$in": id_variants(campaign)}
        fields = {
            "chatId": 1,
            "session": 1,
            "campaignId": 1,
            "status": 1,
            "lastError": 1,
            "content": 1,
            "scheduledAt": 1,
            "finishedAt": 1,
        }
        found = self.collection.find(query, fields, hint=ENDED_INDEX)
        return list(found.sort("finishedAt", DESCENDING).limit(limit))
