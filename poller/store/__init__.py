"""The MongoDB store: one connection, and one part per collection, each the one place for that
collection's queries and indexes.

    store.messages    the scheduled messages: every write that moves one (claims, leases,
                      outcomes), the one home of a message's life
    store.plans       the same collection: its reads (what waits in each session's lane, when
                      it goes, what an operator counts)
    store.receipts    the same collection: delivery receipts on the messages sent
    store.turns       one document per WhatsApp session: whose turn it is to send (pacing), its
                      plan's next free slot, why it cannot send
    store.campaigns   campaign pause/cancel flags, and their rolled-up stats
    store.sessions    the web app's WhatsApp session documents (names, daily caps)
    store.definitions the web app's recurring schedules, and when each occurs next
    store.optouts     chats that asked a session to stop sending to them
    store.heartbeats  one document per live poller
    store.requests    the HTTP API's idempotency keys, and the answers they got
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pymongo import MongoClient

from poller.settings import Settings
from poller.store.activity import Activity
from poller.store.base import Doc, create_index
from poller.store.campaigns import Campaigns
from poller.store.definitions import Definitions
from poller.store.heartbeats import Heartbeats
from poller.store.messages import Messages
from poller.store.optouts import Optouts
from poller.store.plans import Plans
from poller.store.receipts import Receipts
from poller.store.requests import COLLECTION as REQUESTS_COLLECTION
from poller.store.requests import Requests
from poller.store.sessions import Sessions
from poller.store.turns import BUSY, CAPPED, TAKEN, Turns
from poller.timings import Timings

__all__ = ["BUSY", "CAPPED", "TAKEN", "Doc", "Store", "create_index"]


class Store:
    def __init__(self, client: MongoClient[Doc], settings: Settings) -> None:
        self.client = client
        self.timings = Timings.from_settings(settings)
        # Unique per process, so that replicas sharing POLLER_INSTANCE_ID never share claims.
        self.owner = f"{settings.instance_id}/{secrets.token_hex(4)}"
        db = client[settings.mongodb_db]
        self.db = db
        self.messages = Messages(db[settings.messages_collection], self.timings, self.owner)
        self.plans = Plans(db[settings.messages_collection], self.timings, self.owner)
        self.receipts = Receipts(db[settings.messages_collection])
        self.turns = Turns(db[settings.pacing_collection], self.timings, self.owner)
        self.campaigns = Campaigns(db[settings.campaigns_collection], self.messages.collection)
        self.sessions = Sessions(db[settings.sessions_collection])
        self.definitions = Definitions(db[settings.definitions_collection])
        self.optouts = Optouts(db[settings.optouts_collection])
        self.heartbeats = Heartbeats(db[settings.heartbeats_collection], self.timings, self.owner)
        self.activity = Activity(
            db[settings.messages_collection], db[settings.campaigns_collection]
        )
        self.requests = Requests(db[REQUESTS_COLLECTION])

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
            # The same limit where timeoutMS does not apply: the monitor's connect and handshake,
            # a mongodb+srv:// lookup (default 20 s), a server selection outside an operation
            # (default 30 s).
            connectTimeoutMS=int(settings.mongodb_timeout_seconds * 1000),
            serverSelectionTimeoutMS=int(settings.mongodb_timeout_seconds * 1000),
            **options,
        )
        return cls(client, settings)

    def close(self) -> None:
        self.client.close()

    def ensure_indexes(self) -> None:
        """Create the indexes every part needs (idempotent); reaches MongoDB or raises."""
        self.messages.ensure_indexes()
        self.plans.ensure_indexes()
        self.receipts.ensure_indexes()
        self.campaigns.ensure_indexes()
        self.heartbeats.ensure_indexes()
        self.optouts.ensure_indexes()
        self.requests.ensure_indexes()


def _uri_sets(uri: str, option: str) -> bool:
    """Whether a MongoDB URI sets this option (option names are not case-sensitive)."""
    return option.lower() in {k.lower() for k in parse_qs(urlsplit(uri).query)}
