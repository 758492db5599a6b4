"""The MongoDB store: every query and write the poller makes, and the indexes they need.

A message moves through these states (the `status` field):

    pending ─claim─> claimed ─start─> sending ─> sent | failed
       ^               │                 │
       └── retry ──────┘ (release)       └─ lease lapsed ─> unknown
    pending/retry older than the lookback window ─> expired

`claimed` and `sending` are leases: `pickedBy` owns them until `leaseUntil`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bson import ObjectId
from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure

from poller.settings import Settings

Doc = dict[str, Any]

PENDING, RETRY, CLAIMED, SENDING = "pending", "retry", "claimed", "sending"
SENT, FAILED, EXPIRED, UNKNOWN = "sent", "failed", "expired", "unknown"
FINAL = (SENT, FAILED, EXPIRED, UNKNOWN)
CAMPAIGN_DONE = ("completed", "completed_with_failures", "cancelled")
# Any "yes" the web app may write in isSent / isDeleted keeps a message back.
YES = [True, 1, "true"]
NOT_DONE = {"isSent": {"$nin": YES}, "isDeleted": {"$nin": YES}}

# Key patterns, hinted by pattern so an identical index the web app made under another name serves.
CLAIM_INDEX = [("isPicked", ASCENDING), ("scheduledAt", ASCENDING)]
LEASE_INDEX = [("leaseUntil", ASCENDING)]
CAMPAIGN_INDEX = [("campaignId", ASCENDING)]

UNKNOWN_REASON = (
    "The poller stopped while this message was being sent, so it may or may not have been "
    "delivered. It was not sent again, to avoid a duplicate: check the chat before resending."
)
DOUBT_REASON = (
    "Not sent again: an earlier attempt may have reached WhatsApp, and the message is now too "
    "late to try once more. Check the chat before resending."
)


@dataclass(frozen=True)
class Swept:
    expired: int
    unknown: int
    failed: int
    campaigns: list[Any]  # the campaignId of each settled message, as stored


class Store:
    def __init__(self, client: MongoClient[Doc], settings: Settings) -> None:
        self.client = client
        self.db: Database[Doc] = client[settings.mongodb_db]
        self.messages: Collection[Doc] = self.db[settings.messages_collection]
        self.campaigns: Collection[Doc] = self.db[settings.campaigns_collection]
        self.sessions: Collection[Doc] = self.db[settings.sessions_collection]
        self.heartbeats: Collection[Doc] = self.db[settings.heartbeats_collection]
        # A poller that missed three beats is down: each beat says it is alive until then.
        self.heartbeat_max_age = timedelta(seconds=3 * settings.heartbeat_seconds)
        # Unique per process, so that replicas sharing POLLER_INSTANCE_ID never share claims.
        self.owner = f"{settings.instance_id}/{secrets.token_hex(4)}"
        self.lookback = timedelta(seconds=settings.lookback_seconds)
        self.lease = timedelta(seconds=settings.lease_seconds)
        # A claim is taken over only while its message is less late than this: a claim made at
        # the end of the lookback window by a poller that died is still sent once it lapses.
        self.takeover_limit = self.lookback + self.lease
        self.retry_delay = timedelta(seconds=settings.retry_seconds)
        # A send holds its lease for the HTTP request and the write of its outcome, with slack.
        self.send_lease = timedelta(
            seconds=settings.waha_timeout_seconds + settings.mongodb_timeout_seconds + 5
        )

    @classmethod
    def connect(cls, settings: Settings) -> Store:
        # A claim or an outcome acknowledged by a majority survives a failover; a `w` in the
        # URI wins.
        options: dict[str, Any] = {} if _uri_sets(settings.mongodb_uri, "w") else {"w": "majority"}
        client: MongoClient[Doc] = MongoClient(
            settings.mongodb_uri,
            tz_aware=True,
            appname="poller",
            # Bounds every operation, server selection included: a hung server cannot hang a tick.
            # Within it, a retryable read or write is retried (replica sets, sharded clusters).
            timeoutMS=int(settings.mongodb_timeout_seconds * 1000),
            **options,
        )
        return cls(client, settings)

    def close(self) -> None:
        self.client.close()

    def ensure_indexes(self) -> None:
        """Create the indexes the claim, the lease sweep and the rollup need (idempotent)."""
        for keys, name, sparse in (
            (CLAIM_INDEX, "poller_claim", False),
            (LEASE_INDEX, "poller_lease", True),
            (CAMPAIGN_INDEX, "poller_campaign", True),
        ):
            try:
                self.messages.create_index(keys, name=name, sparse=sparse)
            except OperationFailure as exc:
                if exc.code not in (85, 86):  # the same keys exist under another name or options
                    raise
        # MongoDB deletes a heartbeat once its aliveUntil has passed (its TTL monitor runs every
        # 60 s); readers compare aliveUntil with now and do not wait for that.
        try:
            self.heartbeats.create_index(
                "aliveUntil", name="poller_heartbeat_expiry", expireAfterSeconds=0
            )
        except OperationFailure as exc:
            if exc.code not in (85, 86):
                raise

    # -- heartbeats -----------------------------------------------------------------------------

    def beat(self, fields: Doc, now: datetime) -> None:
        beat = {
            "_id": self.owner,
            **fields,
            "lastSeenAt": now,
            "aliveUntil": now + self.heartbeat_max_age,
        }
        self.heartbeats.replace_one({"_id": self.owner}, beat, upsert=True)

    def remove_beat(self) -> None:
        self.heartbeats.delete_one({"_id": self.owner})

    def live_heartbeats(self, now: datetime, instance: str | None = None) -> list[Doc]:
        """Heartbeats of pollers alive now, newest first; `instance` matches an id or the host."""
        query: Doc = {"aliveUntil": {"$gt": now}}
        if instance:
            query["$or"] = [{"_id": instance}, {"instance": instance}, {"host": instance}]
        return list(self.heartbeats.find(query).sort("lastSeenAt", -1))

    # -- finding work -------------------------------------------------------------------------

    def claimable(self, now: datetime) -> Doc:
        """Due, never-finished messages whose scheduled time is inside the lookback window."""
        return {
            "isPicked": {"$ne": True},
            "scheduledAt": {"$gte": now - self.lookback, "$lte": now},
            **NOT_DONE,
            "retryAt": {"$not": {"$gt": now}},
        }

    def of_sessions(self, names: Iterable[str]) -> Doc:
        """Messages sent through one of these WAHA sessions: named by `session`, or else by
        `sessionId` (as `prepare` reads them)."""
        names = list(names)
        ids = [d["_id"] for d in self.sessions.find({"name": {"$in": names}}, {"_id": 1})]
        by_id = {"sessionId": {"$in": [v for i in ids for v in id_variants(i)]}}
        return {
            "$or": [
                {"session": {"$in": names}},
                {**by_id, "session": {"$not": {"$type": "string"}}},
                {**by_id, "session": ""},
            ]
        }

    def note_waiting(self, now: datetime, reason: str, which: Doc | None = None) -> None:
        """Say in lastError why due messages (of `which` sessions) are not being sent now."""
        self.messages.update_many(
            {**self.claimable(now), **(which or {})}, {"$set": {"lastError": reason}}
        )

    def gone(self, now: datetime) -> Doc:
        """Claims whose poller went away: their lease lapsed, or this process holds them from a
        tick that failed half-way (the ticks of one process never overlap)."""
        return {"$or": [{"leaseUntil": {"$lt": now}}, {"pickedBy": self.owner}]}

    def taken_over(self, now: datetime) -> Doc:
        """Claims to take over while their message is less than `takeover_limit` late.

        A send in flight is taken over only under its pre-generated WAHA message id: sent again
        under the same id, WAHA delivers it at most once.
        """
        return {
            "scheduledAt": {"$gte": now - self.takeover_limit},
            "$and": [
                self.gone(now),
                {"$or": [{"status": CLAIMED}, {"status": SENDING, "sendId": {"$type": "string"}}]},
            ],
            **NOT_DONE,
        }

    def claim(self, now: datetime, limit: int, skip: Doc | None = None) -> list[Doc]:
        """Atomically take up to `limit` messages: lapsed claims first, then newly due ones.
        Messages matching `skip` (sessions that cannot send now) are left alone.

        Each document is taken by one conditional update, so of two pollers racing for it
        exactly one wins; the other's update simply does not match.
        """
        until = now + self.lease
        taken: list[Doc] = []
        lapsed = self.taken_over(now)
        pending = self.claimable(now)
        if skip:
            lapsed, pending = {**lapsed, "$nor": [skip]}, {**pending, "$nor": [skip]}
        for query, hint in ((lapsed, LEASE_INDEX), (pending, CLAIM_INDEX)):
            room = limit - len(taken)
            if room <= 0:
                break
            oldest = self.messages.find(query, {"_id": 1}, hint=hint, sort=[(hint[-1][0], 1)])
            ids = [d["_id"] for d in oldest.limit(room)]
            if not ids:
                continue
            self.messages.update_many(
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
                            "leaseUntil": until,
                        }
                    }
                ],
            )
            mine = {"_id": {"$in": ids}, "pickedBy": self.owner, "status": CLAIMED}
            taken.extend(self.messages.find(mine))
        taken.sort(key=_scheduled_key)
        return taken

    def sweep(self, now: datetime) -> Swept:
        """Expire what is too late to send, and settle claims whose poller went away.

        A message that may have reached WhatsApp already (`inDoubt`, or a send in flight that
        cannot be taken over) ends `unknown`, never `expired`: "not sent" would invite a resend.
        """
        campaigns: list[Any] = []
        window = int(self.lookback.total_seconds())
        late = {"isPicked": {"$ne": True}, "scheduledAt": {"$lt": now - self.lookback}, **NOT_DONE}
        lapsed = {
            "status": CLAIMED,
            "leaseUntil": {"$lt": now},
            "scheduledAt": {"$lt": now - self.takeover_limit},
        }
        expired = unknown = 0
        for query, hint, reason in (
            (
                late,
                CLAIM_INDEX,
                f"Not sent: it was more than {window} s past its scheduled time when the poller "
                "could send it.",
            ),
            (
                lapsed,
                LEASE_INDEX,
                "Not sent: the poller that claimed it stopped, and no poller took it over in time.",
            ),
        ):
            expired += self._settle(
                {**query, "inDoubt": {"$ne": True}}, hint, EXPIRED, reason, now, campaigns
            )
            unknown += self._settle(
                {**query, "inDoubt": True}, hint, UNKNOWN, DOUBT_REASON, now, campaigns
            )
        # A send in flight when its poller stopped (or its tick failed) that cannot be taken over.
        in_doubt = {
            "status": SENDING,
            "$and": [
                self.gone(now),
                {
                    "$or": [
                        {"sendId": {"$not": {"$type": "string"}}},
                        {"scheduledAt": {"$lt": now - self.takeover_limit}},
                    ]
                },
            ],
        }
        unknown += self._settle(in_doubt, LEASE_INDEX, UNKNOWN, UNKNOWN_REASON, now, campaigns)
        undated = {
            "isPicked": {"$ne": True},
            "scheduledAt": {"$not": {"$type": "date"}},
            **NOT_DONE,
        }
        failed = self._settle(
            undated,
            CLAIM_INDEX,
            FAILED,
            {
                "$concat": [
                    "Not sent: scheduledAt must be a date, but it is ",
                    {"$type": "$scheduledAt"},
                    ", so the poller cannot tell when to send it.",
                ]
            },
            now,
            campaigns,
        )
        return Swept(expired, unknown, failed, campaigns)

    def _settle(
        self,
        query: Doc,
        hint: list[tuple[str, int]],
        status: str,
        reason: str | Doc,
        now: datetime,
        campaigns: list[Any],
    ) -> int:
        found = list(self.messages.find(query, {"_id": 1, "campaignId": 1}, hint=hint))
        if not found:
            return 0
        campaigns.extend(d.get("campaignId") for d in found)
        # Keep the last attempt's error: it is usually why the message ran out of time.
        last = {"$concat": [reason, " Last attempt: ", {"$toString": "$lastError"}]}
        result = self.messages.update_many(
            {"_id": {"$in": [d["_id"] for d in found]}, **query},
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
                {"$unset": ["leaseUntil", "retryAt"]},
            ],
        )
        return result.modified_count

    # -- one message's life --------------------------------------------------------------------

    def start_sending(self, message_id: Any, now: datetime, send_id: str | None = None) -> bool:
        """Mark a claimed message as in flight, with the WAHA message id it will be sent under
        (kept for every retry); False when it is no longer ours, or was deleted."""
        fields: Doc = {"status": SENDING, "leaseUntil": now + self.send_lease}
        if send_id:
            fields["sendId"] = send_id
        result = self.messages.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": CLAIMED, **NOT_DONE},
            {"$set": fields, "$inc": {"attempts": 1}},
        )
        return result.modified_count == 1

    def mark_sent(self, message_id: Any, waha_message_id: str | None, now: datetime) -> bool:
        # `unknown` too: a slow send that another poller gave up on did go out after all.
        result = self.messages.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [SENDING, UNKNOWN]}},
            {
                "$set": {
                    "status": SENT,
                    "isSent": True,
                    "sentAt": now,
                    "wahaMessageId": waha_message_id,
                    "lastError": None,
                },
                "$unset": {"leaseUntil": "", "retryAt": "", "inDoubt": ""},
            },
        )
        return result.modified_count == 1

    def finish(self, message_id: Any, status: str, reason: str, now: datetime) -> None:
        """End a message this poller holds as `failed` or `unknown`, with the reason."""
        self.messages.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {
                "$set": {"status": status, "finishedAt": now, "lastError": reason},
                "$unset": {"leaseUntil": "", "retryAt": ""},
            },
        )

    def release(
        self,
        message_ids: Iterable[Any],
        reason: str | None = None,
        retry_at: datetime | None = None,
        in_doubt: bool = False,
    ) -> int:
        """Give claims back: they become claimable again (after `retry_at`, when given).
        `in_doubt`: the last attempt may have reached WhatsApp (it timed out)."""
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
        result = self.messages.update_many(
            {"_id": {"$in": ids}, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {"$set": fields, "$unset": {"pickedBy": "", "leaseUntil": ""}},
        )
        return result.modified_count

    def extend(self, message_ids: Iterable[Any], until: datetime) -> None:
        """Renew the lease on claims this poller still holds."""
        self.messages.update_many(
            {"_id": {"$in": list(message_ids)}, "pickedBy": self.owner, "status": CLAIMED},
            {"$set": {"leaseUntil": until}},
        )

    def session_name(self, session_id: ObjectId | str | int) -> str | None:
        found = self.sessions.find_one({"_id": {"$in": id_variants(session_id)}}, {"name": 1})
        name = found.get("name") if found else None
        return name.strip() if isinstance(name, str) and name.strip() else None

    # -- what an operator sees ------------------------------------------------------------------

    def count_due(self, now: datetime) -> int:
        return self.messages.count_documents(self.claimable(now), hint=CLAIM_INDEX)

    def overview(self, now: datetime) -> Doc:
        """Live pollers, the message backlog, the last 24 hours' outcomes, running campaigns."""
        since = now - timedelta(hours=24)
        later = {"isPicked": {"$ne": True}, "scheduledAt": {"$gt": now}, **NOT_DONE}
        last_day = {
            row["_id"]: row["n"]
            for row in self.messages.aggregate(
                [
                    {
                        "$match": {
                            "$or": [{"sentAt": {"$gte": since}}, {"finishedAt": {"$gte": since}}]
                        }
                    },
                    {"$group": {"_id": "$status", "n": {"$sum": 1}}},
                ]
            )
        }
        running = self.campaigns.find(
            {"status": {"$nin": list(CAMPAIGN_DONE)}, "stats": {"$exists": True}},
            {"name": 1, "status": 1, "stats": 1},
        ).limit(50)
        return {
            "instances": self.live_heartbeats(now),
            "messages": {
                "dueNow": self.count_due(now),
                "inProgress": self.messages.count_documents(
                    {"status": {"$in": [CLAIMED, SENDING]}}
                ),
                "scheduledLater": self.messages.count_documents(later, hint=CLAIM_INDEX),
            },
            "last24h": {status: last_day.get(status, 0) for status in FINAL},
            "campaigns": list(running),
        }

    # -- campaigns ------------------------------------------------------------------------------

    def rollup(self, campaign_ids: Iterable[Any], now: datetime) -> None:
        """Recount each campaign; mark it completed once none of its messages can still be sent."""
        for campaign_id in campaign_ids:
            stats = self.campaign_stats(campaign_id)
            unfinished = stats["total"] - stats["sent"] - stats["failed"] - stats["expired"]
            fields: Doc = {"stats": stats}
            if stats["total"] > 0 and unfinished == 0:
                fields["status"] = (
                    "completed" if stats["sent"] == stats["total"] else "completed_with_failures"
                )
                fields["completedAt"] = now
            # A finished campaign's numbers were final when it finished: never overwrite them.
            self.campaigns.update_one(
                {"_id": {"$in": id_variants(campaign_id)}, "status": {"$nin": list(CAMPAIGN_DONE)}},
                {"$set": fields},
            )

    def campaign_stats(self, campaign_id: Any) -> dict[str, int]:
        by_status = {
            row["_id"]: row["n"]
            for row in self.messages.aggregate(
                [
                    {"$match": {"campaignId": {"$in": id_variants(campaign_id)}}},
                    {
                        "$group": {
                            "_id": {
                                "$cond": [
                                    {"$eq": ["$isDeleted", True]},
                                    "deleted",
                                    {"$ifNull": ["$status", PENDING]},
                                ]
                            },
                            "n": {"$sum": 1},
                        }
                    },
                ]
            )
        }
        total = sum(n for status, n in by_status.items() if status != "deleted")
        return {
            "total": total,
            "sent": by_status.get(SENT, 0),
            # Unknown outcomes count as failed: delivery was never confirmed.
            "failed": by_status.get(FAILED, 0) + by_status.get(UNKNOWN, 0),
            "expired": by_status.get(EXPIRED, 0),
            "unknown": by_status.get(UNKNOWN, 0),
        }


def _uri_sets(uri: str, option: str) -> bool:
    """Whether a MongoDB URI sets this option (option names are not case-sensitive)."""
    return option.lower() in {k.lower() for k in parse_qs(urlsplit(uri).query)}


def id_variants(value: Any) -> list[Any]:
    """The web app may store a reference as an ObjectId or as its hex string: match both."""
    variants = [value]
    if isinstance(value, str) and ObjectId.is_valid(value):
        variants.append(ObjectId(value))
    elif isinstance(value, ObjectId):
        variants.append(str(value))
    return variants


def _scheduled_key(doc: Mapping[str, Any]) -> tuple[str, str]:
    scheduled = doc.get("scheduledAt")
    return (scheduled.isoformat() if isinstance(scheduled, datetime) else "", str(doc["_id"]))
