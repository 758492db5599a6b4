"""The messages' last hours as the dashboard shows them: outcomes per minute, how late the sent
ones went out against their planned time, how long pacing held them back, and the latest that
ended without being sent."""

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
# Lateness buckets (sentAt - slotAt), by their lower bound in seconds: a send on time is late
# by the tick's wait and WAHA's answer, a second or two.
LATENESS_FROM = (0, 1, 5, 30, 60, 120)
# Pacing delay buckets (slotAt - scheduledAt), in seconds: a paced campaign's last message is
# planned hours after its first.
PACING_FROM = (0, 60, 600, 1800, 7200, 21600)
# A date's type as `$type` names it.
DATE = "date"


class Activity:
    def __init__(self, collection: Collection[Doc], campaigns: Collection[Doc]) -> None:
        self.collection = collection
        self.campaigns = campaigns  # for the names of the not-sent messages' campaigns

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
        """The messages sent since `since` by how late they went out against the time they
        were planned for (`slotAt`; `scheduledAt` for those sent by versions that did not
        write it): `{"from": 5, "n": 12}` counts those 5 s or more, and less than the next
        bucket's `from`, late."""
        planned = {"$cond": [_is_date("$slotAt"), "$slotAt", "$scheduledAt"]}
        return self._buckets(
            {"$or": [{"slotAt": {"$type": DATE}}, {"scheduledAt": {"$type": DATE}}]},
            {"$subtract": ["$sentAt", planned]},
            since,
            LATENESS_FROM,
        )

    def pacing_delay(self, since: datetime) -> list[Doc]:
        """The messages sent since `since` by how long pacing held them back: from their
        `scheduledAt` to the time they were planned for (`slotAt`), in PACING_FROM's buckets.
        Only those that carry a `slotAt`."""
        return self._buckets(
            {"slotAt": {"$type": DATE}, "scheduledAt": {"$type": DATE}},
            {"$subtract": ["$slotAt", "$scheduledAt"]},
            since,
            PACING_FROM,
        )

    def _buckets(
        self, having: Doc, span: Doc, since: datetime, bounds: tuple[int, ...]
    ) -> list[Doc]:
        """The sent messages since `since` that match `having`, counted by `span` (ms) into
        buckets from each of `bounds` (s); the first takes in negative spans (a clock ahead)."""
        lower = [-(10**15), *(1000 * s for s in bounds[1:])]
        rows = self.collection.aggregate(
            [
                {"$match": {"sentAt": {"$gte": since}, "status": SENT, **having}},
                {
                    "$bucket": {
                        "groupBy": span,
                        "boundaries": [*lower, 10**15],
                        "output": {"n": {"$sum": 1}},
                    }
                },
            ]
        )
        counts = {row["_id"]: row["n"] for row in rows}
        return [{"from": s, "n": counts.get(k, 0)} for s, k in zip(bounds, lower, strict=True)]

    def not_sent(
        self,
        limit: int = 50,
        chat_id: str | None = None,
        campaign: str | None = None,
    ) -> list[Doc]:
        """The latest messages that ended failed, expired or unknown, newest first, with their
        reasons and their campaign's name (`campaignName`, read in one query for them all);
        only one chat's, or one campaign's (by id or by name), when given."""
        query: dict[str, Any] = {"status": {"$in": list(NOT_SENT)}}
        if chat_id:
            query["chatId"] = chat_id
        if campaign:
            ids = id_variants(campaign)
            named = self.campaigns.find({"name": campaign}, {"_id": 1}).limit(100)
            ids += [v for c in named for v in id_variants(c["_id"])]
            query["campaignId"] = {"$in": ids}
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
        rows = list(found.sort("finishedAt", DESCENDING).limit(limit))
        names = _names(self.campaigns, [row.get("campaignId") for row in rows])
        for row in rows:
            row["campaignName"] = names.get(str(row.get("campaignId")))
        return rows


def _names(campaigns: Collection[Doc], ids: list[Any]) -> dict[str, Any]:
    """The name of each of these campaigns, by id as text: one read."""
    variants = (v for i in ids if i is not None for v in id_variants(i))
    wanted = list({(type(v).__name__, str(v)): v for v in variants}.values())
    if not wanted:
        return {}
    found = campaigns.find({"_id": {"$in": wanted}}, {"name": 1})
    return {str(c["_id"]): c.get("name") for c in found}


def _is_date(field: str) -> Doc:
    return {"$eq": [{"$type": field}, DATE]}
