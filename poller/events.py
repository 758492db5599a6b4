"""WAHA's events, posted as webhooks to `poller run`'s HTTP server: delivery receipts
(`message.ack`) and opt-out keywords in the messages people send (`message`).

A post is answered 200 only once what it says is written to MongoDB; when MongoDB cannot be
reached it gets a 503, and WAHA posts it again later. Each event is applied so that a repeat,
or events in any order, leave the same result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from pymongo.errors import PyMongoError

from poller.contract import derived_id, normalise_chat_id
from poller.store import Doc, Store

# WAHA signs the raw body with HMAC-SHA512 under its webhook's `hmac.key`, in hex.
SIGNATURE_HEADER = "HTTP_X_WEBHOOK_HMAC"
# Or a shared secret in a header the webhook's `customHeaders` sets.
SECRET_HEADER_NAME = "X-Poller-Secret"
SECRET_HEADER = "HTTP_X_POLLER_SECRET"
ACKS = ("-1", "0", "1", "2", "3", "4", "unknown")


@dataclass(frozen=True)
class Answer:
    status: str
    body: dict[str, Any]


@dataclass
class Receiver:
    """Checks, reads and applies WAHA's webhook posts (one instance per `poller run`)."""

    store: Store
    hmac_key: str
    secret: str
    max_bytes: int
    optout_words: frozenset[str]
    optin_words: frozenset[str]
    reply: str = ""
    # What the metrics show: acks by value ("unknown": no message has that id), opt-outs.
    acks: Counter[str] = field(default_factory=Counter)
    optouts: int = 0
    _campaigns: set[Any] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, method: str, headers: dict[str, str], read: Any, length: int) -> Answer:
        """Answer one post. `headers`: WSGI environ keys (HTTP_...); `read(n)` reads the body."""
        if method != "POST":
            return Answer("405 Method Not Allowed", {"error": "POST only"})
        if length > self.max_bytes:
            return Answer("413 Payload Too Large", {"error": f"over {self.max_bytes} bytes"})
        body = read(length) if length > 0 else b""
        if not self._authentic(headers, body):
            return Answer("401 Unauthorized", {"error": "bad or missing signature"})
        try:
            event = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Answer("400 Bad Request", {"error": "the body is not JSON"})
        if not isinstance(event, dict) or not isinstance(event.get("payload"), dict):
            return Answer("400 Bad Request", {"error": "not a WAHA event"})
        try:
            self.apply(event)
        except PyMongoError as exc:
            logger.warning("WAHA event not recorded (WAHA will post it again): {}", exc)
            return Answer("503 Service Unavailable", {"error": "MongoDB is unavailable"})
        return Answer("200 OK", {"ok": True})

    def _authentic(self, headers: dict[str, str], body: bytes) -> bool:
        if self.hmac_key:
            expected = hmac.new(self.hmac_key.encode(), body, hashlib.sha512).hexdigest()
            given = headers.get(SIGNATURE_HEADER, "").strip().lower()
            return hmac.compare_digest(given.encode(), expected.encode())
        given = headers.get(SECRET_HEADER, "")
        return bool(self.secret) and hmac.compare_digest(given.encode(), self.secret.encode())

    def apply(self, event: Doc) -> None:
        """Apply one event: an ack to its message, an inbound keyword to the opt-outs; any
        other event is ignored."""
        payload, session = event["payload"], event.get("session")
        at = _when(event.get("timestamp"))
        if event.get("event") == "message.ack":
            self._ack(payload, at)
        elif event.get("event") == "message" and isinstance(session, str):
            self._inbound(payload, session, at, str(event.get("id") or ""))

    def _ack(self, payload: Doc, at: datetime) -> None:
        ack, waha_id = payload.get("ack"), payload.get("id")
        if not isinstance(ack, int) or isinstance(ack, bool) or not isinstance(waha_id, str):
            return
        message = self.store.receipts.acknowledge(waha_id, ack, at)
        with self._lock:
            self.acks[str(ack) if message is not None else "unknown"] += 1
            if message is not None and message.get("campaignId") is not None:
                self._campaigns.add(message["campaignId"])

    def _inbound(self, payload: Doc, session: str, at: datetime, event_id: str) -> None:
        if payload.get("fromMe") is not False or not isinstance(payload.get("body"), str):
            return
        chat_id = normalise_chat_id(payload.get("from"))
        if chat_id is None or chat_id.endswith("@g.us"):
            return  # a group's members are not opted out by one of them
        word = " ".join(payload["body"].split()).upper()
        if word in self.optout_words:
            if self.store.optouts.add(session, chat_id, at, payload["body"]):
                logger.info("{} opted out of WhatsApp session '{}'", chat_id, session)
                with self._lock:
                    self.optouts += 1
                if self.reply:
                    self._confirm(session, chat_id, at, event_id)
        elif word in self.optin_words and self.store.optouts.remove(session, chat_id):
            logger.info("{} opted in again to WhatsApp session '{}'", chat_id, session)

    def _confirm(self, session: str, chat_id: str, at: datetime, event_id: str) -> None:
        """Schedule the confirmation reply, once per opt-out event (its id)."""
        reply = {
            "_id": derived_id(at, "optout-reply", session, chat_id, event_id),
            "scheduledAt": datetime.now(UTC),
            "content": self.reply,
            "chatId": chat_id,
            "session": session,
            "priority": 1,
            "optOutReply": True,
            "isSent": False,
            "isDeleted": False,
            "isPicked": False,
        }
        self.store.messages.insert([reply])

    def drain(self) -> set[Any]:
        """The campaigns with new receipts since the last call: each is recounted once per
        tick, however many acks it got."""
        with self._lock:
            found, self._campaigns = self._campaigns, set()
        return found

    def again(self, campaigns: set[Any]) -> None:
        """Campaigns whose recount failed: recounted at the next tick."""
        with self._lock:
            self._campaigns |= campaigns


def _when(timestamp: object) -> datetime:
    """An event's time (WAHA: Unix milliseconds); now when it has none."""
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool) and timestamp > 0:
        try:
            return datetime.fromtimestamp(timestamp / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            pass
    return datetime.now(UTC)
