"""WAHA's events, posted as webhooks to `poller run`'s HTTP server: delivery receipts
(`message.ack`) and opt-out keywords in the messages people send (`message`).

A post proves that it comes from WAHA in one of three ways, whichever the WAHA edition can
carry: the webhook URL's last path segment is WEBHOOK_SECRET (every edition: WAHA Core signs
nothing and sends no custom header), the `X-Poller-Secret` header is, or its `X-Webhook-Hmac`
is the HMAC-SHA512 of the body under WEBHOOK_HMAC_KEY. Every comparison takes constant time.

A post is answered 200 only once what it says is written to MongoDB; when MongoDB cannot be
reached it gets a 503, and a WAHA that retries posts it again later. A body that is not a
well-formed event gets 400, whatever it holds. Each event is applied so that a repeat, or
events in any order, leave the same result: acks only rise, and an opt-out or opt-in that
happened before the chat's last change changes nothing. Refused posts are counted by reason
(`refusals`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson.errors import BSONError
from loguru import logger
from pymongo.errors import PyMongoError

from poller.contract import derived_id, message_key, normalise_chat_id
from poller.keywords import fold
from poller.refusals import Refusals
from poller.store import Doc, Store

# Where WAHA posts its events (EVENTS=webhook), optionally followed by /<WEBHOOK_SECRET>.
EVENTS_PATH = "/waha/events"
# WAHA signs the raw body with HMAC-SHA512 under its webhook's `hmac.key`, in hex.
SIGNATURE_HEADER = "HTTP_X_WEBHOOK_HMAC"
# Or a shared secret in a header the webhook's `customHeaders` sets.
SECRET_HEADER_NAME = "X-Poller-Secret"
SECRET_HEADER = "HTTP_X_POLLER_SECRET"
ACKS = ("-1", "0", "1", "2", "3", "4", "unknown")
# WAHA 2025.12.2+ posts a group message's receipts as `message.ack.group`.
ACK_EVENTS = ("message.ack", "message.ack.group")
ACK_VALUES = range(-1, 5)  # ERROR, PENDING, SERVER, DEVICE, READ, PLAYED
# An event's text fields longer than this are not WAHA's.
MAX_TEXT = 65_536


class BadEvent(ValueError):
    """A body that is JSON but not a well-formed WAHA event."""


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
    # The phone number's chat id of an `@lid` chat, as WAHA knows it (session, lid); None
    # when it does not.
    phone_of: Callable[[str, str], str | None] | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # What the metrics show: acks by value ("unknown": no message has that id), opt-outs,
    # refused posts by reason.
    acks: Counter[str] = field(default_factory=Counter)
    optouts: int = 0
    refusals: Refusals = field(default_factory=Refusals)
    _campaigns: set[Any] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, environ: Mapping[str, Any]) -> Answer:
        """Answer one post to EVENTS_PATH (a WSGI environ)."""
        answer = self._answer(environ)
        if not answer.status.startswith(("200", "503")):
            self.refusals.add(answer.body["reason"], self.clock(), environ.get("REMOTE_ADDR"))
        return answer

    def _answer(self, environ: Mapping[str, Any]) -> Answer:
        if environ.get("REQUEST_METHOD") != "POST":
            return _refused("405 Method Not Allowed", "not_post")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _refused("400 Bad Request", "bad_body")
        if length > self.max_bytes:
            return _refused("413 Payload Too Large", "too_large")
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        refusal = self._refusal(environ, body)
        if refusal is not None:
            return _refused("401 Unauthorized", refusal)
        try:
            self.apply(_event(body))
        except PyMongoError as exc:
            logger.warning("WAHA event not recorded: {}", exc)
            return Answer("503 Service Unavailable", {"error": "MongoDB is unavailable"})
        except (BadEvent, BSONError, OverflowError, UnicodeError):
            return _refused("400 Bad Request", "bad_body")
        return Answer("200 OK", {"ok": True})

    def _refusal(self, environ: Mapping[str, Any], body: bytes) -> str | None:
        """Why the post is not authentic (a Refusals reason), or None when it is."""
        path = str(environ.get("PATH_INFO") or "")
        tail = path[len(EVENTS_PATH) + 1 :] if path.startswith(EVENTS_PATH + "/") else ""
        secrets = [s for s in (tail, str(environ.get(SECRET_HEADER) or "")) if s]
        signature = str(environ.get(SIGNATURE_HEADER) or "").strip().lower()
        if self.secret and any(_same(s, self.secret) for s in secrets):
            return None
        if self.hmac_key and signature:
            expected = hmac.new(self.hmac_key.encode(), body, hashlib.sha512).hexdigest()
            if _same(signature, expected):
                return None
        if secrets:
            return "wrong_secret"
        return "bad_signature" if self.hmac_key and signature else "unsigned"

    def apply(self, event: Doc) -> None:
        """Apply one event: an ack to its message, an inbound keyword to the opt-outs; any
        other event is ignored. Raises BadEvent when its fields are not WAHA's."""
        payload, session = event["payload"], event.get("session")
        if event.get("event") in ACK_EVENTS:
            self._ack(payload, self._when(event))
        elif event.get("event") == "message" and isinstance(session, str):
            self._inbound(payload, session, self._when(event, payload))

    def _ack(self, payload: Doc, at: datetime) -> None:
        ack, waha_id = payload.get("ack"), _text(payload, "id")
        if not isinstance(ack, int) or isinstance(ack, bool) or ack not in ACK_VALUES:
            raise BadEvent("an ack is an integer from -1 to 4")
        key = message_key(waha_id or "")
        if waha_id is None or key is None:
            raise BadEvent("an ack names its message")
        message = self.store.receipts.acknowledge(waha_id, key, ack, at)
        with self._lock:
            self.acks[str(ack) if message is not None else "unknown"] += 1
            if message is not None and message.get("campaignId") is not None:
                self._campaigns.add(message["campaignId"])

    def _inbound(self, payload: Doc, session: str, at: datetime) -> None:
        text, sender = _text(payload, "body"), _text(payload, "from")
        if payload.get("fromMe") is True or text is None:
            return
        chat_id = normalise_chat_id(sender)
        if chat_id is None or chat_id.endswith("@g.us"):
            return  # a group's members are not opted out by one of them
        word = fold(text)
        if word not in self.optout_words and word not in self.optin_words:
            return
        chats = [chat_id, *self._phone(session, chat_id, payload)]
        if word in self.optout_words:
            if any([self.store.optouts.add(session, chat, at, text) for chat in chats]):
                logger.info("{} opted out of WhatsApp session '{}'", " = ".join(chats), session)
                with self._lock:
                    self.optouts += 1
                if self.reply:
                    self._confirm(session, chat_id, at, _text(payload, "id") or "")
        elif any([self.store.optouts.remove(session, chat, at) for chat in chats]):
            logger.info("{} opted in again to WhatsApp session '{}'", " = ".join(chats), session)

    def _phone(self, session: str, chat_id: str, payload: Doc) -> list[str]:
        """The phone number's chat id of an `@lid` sender: from the event itself when its
        engine gives it, else asked of WAHA; [] when neither knows it (the opt-out then
        stops messages to the `@lid` id only)."""
        if not chat_id.endswith("@lid"):
            return []
        phone = _alternative(payload)
        if phone is None and self.phone_of is not None:
            phone = normalise_chat_id(self.phone_of(session, chat_id))
        if phone is None or phone.endswith("@lid"):
            logger.warning(
                "{} wrote an opt-out keyword to session '{}', but WAHA gave no phone number for "
                "it: messages addressed to its phone number are still sent",
                chat_id,
                session,
            )
            return []
        return [phone]

    def _when(self, event: Doc, message: Doc | None = None) -> datetime:
        """When the event happened: an inbound `message`'s own time (Unix seconds), else the
        event's (Unix milliseconds, newer WAHA only), else now; never later than now."""
        now = self.clock()
        given = [(message.get("timestamp"), 1)] if message is not None else []
        for value, unit in [*given, (event.get("timestamp"), 1000)]:
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                try:
                    return min(now, datetime.fromtimestamp(value / unit, UTC))
                except (OverflowError, OSError, ValueError):
                    raise BadEvent("a timestamp out of range") from None
        return now

    def _confirm(self, session: str, chat_id: str, at: datetime, message_id: str) -> None:
        """Schedule the confirmation reply, once per opt-out message (its id)."""
        reply = {
            "_id": derived_id(at, "optout-reply", session, chat_id, message_id),
            "scheduledAt": self.clock(),
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


def _event(body: bytes) -> Doc:
    try:
        event = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadEvent("the body is not JSON") from exc
    if not isinstance(event, dict) or not isinstance(event.get("payload"), dict):
        raise BadEvent("not a WAHA event")
    if not isinstance(event.get("event"), str):
        raise BadEvent("an event has a name")
    return event


def _text(payload: Doc, name: str) -> str | None:
    """A text field of an event, or None when it has none; BadEvent when it is not text
    WAHA could have sent."""
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise BadEvent(f"{name} is not text")
    value.encode()  # UnicodeError for a lone surrogate, which MongoDB cannot store
    return value


def _alternative(payload: Doc) -> str | None:
    """The phone number an engine gives beside an `@lid` sender (NOWEB's and GOWS's raw
    message key: `senderPn`, `remoteJidAlt`, `participantAlt`)."""
    raw = payload.get("_data")
    key = raw.get("key") if isinstance(raw, dict) else None
    for source in (key, raw):
        if isinstance(source, dict):
            for name in ("senderPn", "remoteJidAlt", "participantAlt", "senderAlt"):
                found = normalise_chat_id(source.get(name))
                if found is not None and not found.endswith("@lid"):
                    return found
    return None


def _refused(status: str, reason: str) -> Answer:
    return Answer(status, {"error": Refusals.REASONS[reason], "reason": reason})


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of text a client sent and ours (digests of equal length)."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given.encode()).digest(), digest(expected.encode()).digest())
