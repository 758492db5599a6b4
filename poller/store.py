"""The MongoDB store: every query and write the poller makes, and the indexes they need.

A message moves through these states (the `status` field):

    pending ─claim─> claimed ─start─> sending ─> sent | failed
       ^               │                 │
       └── retry ──────┘ (release)       └─ lease lapsed ─> unknown
    pending/retry older than the lookback window ─> expired
    not yet sent when its campaign is cancelled ─> cancelled

`claimed` and `sending` are leases: `pickedBy` owns them until `leaseUntil`.

A message is due from its `scheduledAt`, or from its `heldUntil` when the poller itself held
it back until later (pacing, the daily cap, quiet hours, a paused campaign): that wait never
expires it. A `heldUntil` older than `scheduledAt` (the web app rescheduled it) no longer counts.
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
from pymongo.errors import DuplicateKeyError, OperationFailure

from poller.settings import Settings

Doc = dict[str, Any]

PENDING, RETRY, CLAIMED, SENDING = "pending", "retry", "claimed", "sending"
SENT, FAILED, EXPIRED, UNKNOWN = "sent", "failed", "expired", "unknown"
CANCELLED = "cancelled"
FINAL = (SENT, FAILED, EXPIRED, UNKNOWN, CANCELLED)
COMPLETED = ("completed", "completed_with_failures")
# What the web app writes in a campaign's status to stop it for a while, or for good.
PAUSED = "paused"
# The outcome of Store.reserve: the session's turn to send, or why not.
TAKEN, BUSY, CAPPED = "taken", "busy", "capped"
# Any "yes" the web app may write in isSent / isDeleted keeps a message back.
YES = [True, 1, "true"]
NOT_DONE = {"isSent": {"$nin": YES}, "isDeleted": {"$nin": YES}}

# Key patterns, hinted by pattern so an identical index the web app made under another name serves.
CLAIM_INDEX = [("isPicked", ASCENDING), ("scheduledAt", ASCENDING)]
LEASE_INDEX = [("leaseUntil", ASCENDING)]
CAMPAIGN_INDEX = [("campaignId", ASCENDING)]
HOLD_INDEX = [("heldUntil", ASCENDING)]
# Held until after its scheduled time: due from heldUntil, not from scheduledAt.
HELD = {"$gt": ["$heldUntil", "$scheduledAt"]}
CAMPAIGN_STATUS_INDEX = [("status", ASCENDING)]

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
        self.pacing: Collection[Doc] = self.db[settings.pacing_collection]
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
        self.timeout = timedelta(seconds=settings.mongodb_timeout_seconds)
        self.tick_interval = timedelta(seconds=settings.poll_interval_seconds)
        # A send holds its lease for the HTTP request and the write of its outcome, with slack.
        self.send_lease = timedelta(
            seconds=settings.waha_timeout_seconds + settings.mongodb_timeout_seconds + 5
        )
        # A session's turn lasts through the steps before the send (a message id, typing);
        # just before the send it is renewed for the send itself and the longest gap (`fence`).
        # A poller that dies holding it blocks the session no longer than that.
        pacing_max = timedelta(seconds=settings.pacing_max_seconds)
        self.turn_hold = (
            timedelta(seconds=2 * settings.waha_timeout_seconds + 15 + settings.typing_max_seconds)
            + pacing_max
        )
        self.fence_hold = self.send_lease + pacing_max
        # A message the poller holds back (pacing, a paused campaign) has its heldUntil moved
        # up once it is this old: a quarter of the window, leaving the rest for a tick to come.
        self.hold_refresh = self.lookback / 4

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
        for collection, keys, name, sparse in (
            (self.messages, CLAIM_INDEX, "poller_claim", False),
            (self.messages, LEASE_INDEX, "poller_lease", True),
            (self.messages, CAMPAIGN_INDEX, "poller_campaign", True),
            (self.messages, HOLD_INDEX, "poller_hold", True),
            (self.campaigns, CAMPAIGN_STATUS_INDEX, "poller_campaign_status", False),
        ):
            try:
                collection.create_index(keys, name=name, sparse=sparse)
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
        """Due, never-finished messages whose scheduled time is inside the lookback window
        (and that the poller is not holding back)."""
        return {
            "isPicked": {"$ne": True},
            "scheduledAt": {"$gte": now - self.lookback, "$lte": now},
            "$expr": {"$not": [HELD]},
            **NOT_DONE,
            "retryAt": {"$not": {"$gt": now}},
        }

    def held(self, now: datetime) -> Doc:
        """Due, never-finished messages the poller held back until a time inside the window."""
        return {
            "heldUntil": {"$gte": now - self.lookback, "$lte": now},
            "$expr": HELD,
            "isPicked": {"$ne": True},
            **NOT_DONE,
            "retryAt": {"$not": {"$gt": now}},
        }

    def due(self, now: datetime) -> list[tuple[Doc, list[tuple[str, int]]]]:
        """The queries of every message that may be sent now, each with the index it needs."""
        return [(self.claimable(now), CLAIM_INDEX), (self.held(now), HOLD_INDEX)]

    def next_due(self, now: datetime) -> datetime | None:
        """When the next message not due yet becomes due, if that is before the next regular
        tick: its scheduledAt, or the heldUntil the poller gave it (quiet hours, a daily cap).

        Three reads that follow an index in time order and stop at their first match, with no
        filter beyond the index's own fields: a message that is deleted or sent by then only
        makes a tick find nothing to do.
        """
        until = {"$gt": now, "$lte": now + self.tick_interval}
        found = [
            self.messages.find_one(
                # false, or missing: the web app may not write isPicked at all
                {"isPicked": picked, "scheduledAt": until},
                {"scheduledAt": 1, "_id": 0},
                sort=[("scheduledAt", ASCENDING)],
            )
            for picked in (False, None)
        ]
        held = self.messages.find_one(
            {"heldUntil": until}, {"heldUntil": 1, "_id": 0}, sort=[("heldUntil", ASCENDING)]
        )
        times = [d["scheduledAt"] for d in found if d]
        if held:
            times.append(held["heldUntil"])
        return min(times, default=None)

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
        for query, hint in self.due(now):
            self.messages.update_many(
                {"$and": [query, which or {}]}, {"$set": {"lastError": reason}}, hint=hint
            )

    def hold(
        self, now: datetime, which: Doc, until: datetime | None = None, reason: str | None = None
    ) -> int:
        """Hold due messages (matching `which`) back: they are late from `until` on, not before.

        With `until` (the daily cap, quiet hours) they are not claimed before it either.
        Without it (pacing, a paused campaign) they stay claimable, and only those held for
        a while are written, so that a long wait costs one write per message now and then.
        """
        fields: Doc = {"heldUntil": until or now}
        if reason is not None:
            fields["lastError"] = reason
        stale = now - self.hold_refresh
        held = 0
        for query, hint in self.due(now):
            extra = {}
            if until is None:
                extra = _due_before(stale)
            result = self.messages.update_many(
                {"$and": [query, which, extra]}, {"$set": fields}, hint=hint
            )
            held += result.modified_count
        return held

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
            "$and": [
                self.gone(now),
                {"$or": [{"status": CLAIMED}, {"status": SENDING, "sendId": {"$type": "string"}}]},
                _due_from(now - self.takeover_limit),
            ],
            **NOT_DONE,
        }

    def claim(
        self, now: datetime, limit: int, skip: Doc | None = None, one_per_session: bool = False
    ) -> list[Doc]:
        """Atomically take up to `limit` messages: lapsed claims first, then newly due ones.
        Messages matching `skip` (sessions or campaigns that cannot send now) are left alone;
        `one_per_session` takes the oldest message of each session only (pacing).

        Each document is taken by one conditional update, so of two pollers racing for it
        exactly one wins; the other's update simply does not match.
        """
        until = now + self.lease
        taken: list[Doc] = []
        for query, hint in [(self.taken_over(now), LEASE_INDEX), *self.due(now)]:
            if skip:
                query = {**query, "$nor": [skip]}
            room = limit - len(taken)
            if room <= 0:
                break
            ids = self._oldest(query, hint, room, one_per_session)
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

    def _oldest(
        self, query: Doc, hint: list[tuple[str, int]], limit: int, one_per_session: bool
    ) -> list[Any]:
        order = hint[-1][0]
        if not one_per_session:
            found = self.messages.find(query, {"_id": 1}, hint=hint, sort=[(order, 1)])
            return [d["_id"] for d in found.limit(limit)]
        firsts = self.messages.aggregate(
            [
                {"$match": query},
                {"$sort": {order: 1}},
                {
                    "$group": {
                        "_id": {"session": "$session", "sessionId": "$sessionId"},
                        "first": {"$first": "$_id"},
                        "at": {"$first": f"${order}"},
                    }
                },
                {"$sort": {"at": 1}},
                {"$limit": limit},
            ],
            hint=dict(hint),  # aggregate takes a document, not a list of pairs
        )
        return [row["first"] for row in firsts]

    def sweep(self, now: datetime) -> Swept:
        """Expire what is too late to send, and settle claims whose poller went away.

        A message that may have reached WhatsApp already (`inDoubt`, or a send in flight that
        cannot be taken over) ends `unknown`, never `expired`: "not sent" would invite a resend.
        """
        campaigns: list[Any] = []
        window = int(self.lookback.total_seconds())
        cutoff = now - self.lookback
        base = {"isPicked": {"$ne": True}, **NOT_DONE}
        late = {**base, "scheduledAt": {"$lt": cutoff}, "$expr": {"$not": [HELD]}}
        late_held = {**base, "heldUntil": {"$lt": cutoff}, "$expr": HELD}
        lapsed = {
            "status": CLAIMED,
            "leaseUntil": {"$lt": now},
            **_due_before(now - self.takeover_limit),
        }
        too_late = (
            f"Not sent: it was more than {window} s past its scheduled time when the poller "
            "could send it."
        )
        expired = unknown = 0
        for query, hint, reason in (
            (late, CLAIM_INDEX, too_late),
            (late_held, HOLD_INDEX, too_late),
            (
                lapsed,
                LEASE_INDEX,
                "Not sent: the poller that claimed it stopped, and no poller took it over in time.",
            ),
        ):
            # One read for both outcomes: nothing is late in almost every tick.
            found = list(self.messages.find(query, {"campaignId": 1, "inDoubt": 1}, hint=hint))
            sure = [d for d in found if d.get("inDoubt") is not True]
            doubtful = [d for d in found if d.get("inDoubt") is True]
            sure_query = {**query, "inDoubt": {"$ne": True}}
            expired += self._settle(sure_query, hint, EXPIRED, reason, now, campaigns, sure)
            doubt_query = {**query, "inDoubt": True}
            unknown += self._settle(
                doubt_query, hint, UNKNOWN, DOUBT_REASON, now, campaigns, doubtful
            )
        # A send in flight when its poller stopped (or its tick failed) that cannot be taken over.
        in_doubt = {
            "status": SENDING,
            "$and": [
                self.gone(now),
                {
                    "$or": [
                        {"sendId": {"$not": {"$type": "string"}}},
                        _due_before(now - self.takeover_limit),
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
        found: list[Doc] | None = None,
    ) -> int:
        """End what `query` matches (of `found`, when the caller read them already)."""
        if found is None:
            found = list(self.messages.find(query, {"campaignId": 1}, hint=hint))
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
                {"$unset": ["leaseUntil", "retryAt", "heldUntil"]},
            ],
        )
        return result.modified_count

    def cancel(self, now: datetime) -> tuple[int, list[Any]]:
        """End `cancelled` every message not yet sending of each campaign the web app cancelled
        (and that the poller has not finished with). Returns the count and those campaigns."""
        cancelled = [
            c["_id"]
            for c in self.campaigns.find(
                {"status": CANCELLED, "completedAt": {"$exists": False}}, {"_id": 1}
            )
        ]
        count = 0
        for campaign_id in cancelled:
            unsent: Doc = {
                "campaignId": {"$in": id_variants(campaign_id)},
                "status": {"$nin": [SENDING, *FINAL]},
                **NOT_DONE,
            }
            reason = "Not sent: its campaign was cancelled."
            doubt = {**unsent, "inDoubt": True}  # an earlier attempt may have reached WhatsApp
            doubtful = (
                "Not sent again: its campaign was cancelled, but an earlier attempt may have "
                "reached WhatsApp. Check the chat before resending."
            )
            self._settle(doubt, CAMPAIGN_INDEX, UNKNOWN, doubtful, now, [])
            unsent["inDoubt"] = {"$ne": True}
            count += self._settle(unsent, CAMPAIGN_INDEX, CANCELLED, reason, now, [])
        return count, cancelled

    def paused_campaigns(self) -> list[Any]:
        found = self.campaigns.find({"status": PAUSED}, {"_id": 1})
        return [v for c in found for v in id_variants(c["_id"])]

    # -- pacing: one document per WhatsApp session, shared by every replica ----------------------

    def reserve(self, session: str, now: datetime, day: str, cap: int | None) -> str:
        """Take the session's turn to send: TAKEN, or BUSY (another message of it is being
        sent, or its pacing gap has not passed), or CAPPED (it sent `cap` messages on `day`).

        One conditional upsert: of two replicas asking at once, exactly one gets the turn.
        """
        if cap is not None and cap <= 0:
            return CAPPED
        query: Doc = {"_id": session, "nextAt": {"$lte": now}}
        if cap is not None:
            query["$or"] = [{"day": {"$ne": day}}, {"count": {"$lt": cap}}]
        today = {"$eq": ["$day", day]}
        try:
            self.pacing.update_one(
                query,
                [
                    {
                        "$set": {
                            "nextAt": now + self.turn_hold,
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
            current = self.pacing.find_one({"_id": session}) or {}
        next_at = current.get("nextAt")
        if isinstance(next_at, datetime) and next_at > now:
            return BUSY
        return CAPPED if cap is not None and current.get("day") == day else BUSY

    def fence(self, session: str, now: datetime) -> bool:
        """Renew this poller's turn for the send it is about to make; False when the turn
        lapsed and another poller took it (this message must then wait)."""
        result = self.pacing.update_one(
            {"_id": session, "by": self.owner}, {"$set": {"nextAt": now + self.fence_hold}}
        )
        return result.matched_count == 1

    def end_turn(self, session: str, next_at: datetime, sent: bool) -> None:
        """Give the turn back: the session's next message waits until `next_at`. A turn that
        sent nothing does not count towards the day's cap."""
        update: Doc = {"$set": {"nextAt": next_at}}
        if not sent:
            update["$inc"] = {"count": -1}
        self.pacing.update_one({"_id": session, "by": self.owner}, update)

    def turns(self, now: datetime) -> dict[str, datetime]:
        """Sessions that cannot send yet (a send in progress, or its gap), with until when."""
        return {d["_id"]: d["nextAt"] for d in self.pacing.find({"nextAt": {"$gt": now}})}

    def daily_caps(self) -> dict[str, Any]:
        """The `dailyCap` of each session document that sets one, as written (the caller
        validates it), by session name."""
        found = self.sessions.find(
            {"dailyCap": {"$exists": True, "$ne": None}}, {"name": 1, "dailyCap": 1}
        )
        return {d["name"]: d["dailyCap"] for d in found if isinstance(d.get("name"), str)}

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
                "$unset": {"leaseUntil": "", "retryAt": "", "inDoubt": "", "heldUntil": ""},
            },
        )
        return result.modified_count == 1

    def finish(self, message_id: Any, status: str, reason: str, now: datetime) -> None:
        """End a message this poller holds as `failed` or `unknown`, with the reason."""
        self.messages.update_one(
            {"_id": message_id, "pickedBy": self.owner, "status": {"$in": [CLAIMED, SENDING]}},
            {
                "$set": {"status": status, "finishedAt": now, "lastError": reason},
                "$unset": {"leaseUntil": "", "retryAt": "", "heldUntil": ""},
            },
        )

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
            {"status": {"$nin": [*COMPLETED, CANCELLED]}, "stats": {"$exists": True}},
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
        """Recount each campaign; mark it completed once none of its messages can still be sent.
        A cancelled campaign keeps its status and gets `completedAt` once nothing is in flight."""
        for campaign_id in campaign_ids:
            stats = self.campaign_stats(campaign_id)
            ended = stats["sent"] + stats["failed"] + stats["expired"] + stats["cancelled"]
            done = "completed" if stats["sent"] == stats["total"] else "completed_with_failures"
            fields: Doc = {"stats": stats}
            if ended == stats["total"] > 0:
                cancelled = {"$eq": ["$status", CANCELLED]}
                fields["status"] = {"$cond": [cancelled, CANCELLED, done]}
                fields["completedAt"] = now
            # A finished campaign's numbers were final when it finished: never overwrite them.
            unfinished = {
                "_id": {"$in": id_variants(campaign_id)},
                "status": {"$nin": list(COMPLETED)},
                "completedAt": {"$exists": False},
            }
            self.campaigns.update_one(unfinished, [{"$set": fields}])
            if stats["total"] == 0:  # a cancelled campaign without messages is done too
                self.campaigns.update_one(
                    {**unfinished, "status": CANCELLED}, {"$set": {"completedAt": now}}
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
            "cancelled": by_status.get(CANCELLED, 0),
        }


def _due_before(time: datetime) -> Doc:
    """Messages due (from the later of scheduledAt and heldUntil) before `time`."""
    return {
        "scheduledAt": {"$lt": time},
        "$or": [{"heldUntil": {"$not": {"$type": "date"}}}, {"heldUntil": {"$lt": time}}],
    }


def _due_from(time: datetime) -> Doc:
    """Messages due (from the later of scheduledAt and heldUntil) at or after `time`."""
    return {"$or": [{"scheduledAt": {"$gte": time}}, {"heldUntil": {"$gte": time}}]}


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
