"""One tick: settle what is late or abandoned, claim what is due, send it, roll campaigns up."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from loguru import logger
from pymongo.errors import PyMongoError, WriteError

from poller.breaker import SERVER, Breakers
from poller.store import FAILED, SENDING, UNKNOWN, Doc, Store
from poller.waha import Outcome, Verdict, WahaClient

# WhatsApp ids WAHA can send to: a person (c.us, lid), a group (g.us), a channel (newsletter).
CHAT_ID = re.compile(
    r"^(?:\d{5,20}@c\.us|\d{5,25}@lid|\d{5,20}(?:-\d{5,20})?@g\.us|\d{5,25}@newsletter)$"
)
# A bare phone number, international format; spaces, dashes, dots and brackets are ignored.
PHONE = re.compile(r"^\+?[\d\s().\-]+$")


@dataclass
class TickCounts:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0
    unknown: int = 0
    released: int = 0
    key_rejected: bool = False
    # sentAt - scheduledAt of each message sent, in seconds (for the lateness metric).
    lateness: list[float] = field(default_factory=list)

    def totals(self) -> dict[str, int | bool]:
        """The counts alone, as written to the heartbeat and returned by run_once()."""
        return {k: v for k, v in asdict(self).items() if k != "lateness"}

    def summary(self) -> str:
        return (
            f"claimed={self.claimed} sent={self.sent} retried={self.retried} "
            f"failed={self.failed} expired={self.expired} unknown={self.unknown}"
        )


@dataclass(frozen=True)
class Ready:
    session: str
    chat_id: str
    text: str


def tick(
    store: Store,
    waha: WahaClient,
    batch_size: int,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    breakers: Breakers | None = None,
) -> TickCounts:
    """Run one tick and return its counts.

    `now` fixes the clock (tests, replays); without it every step reads the wall clock.
    `stop` is checked between messages: once set, the message in flight finishes and the
    claims not yet started are released. `breakers` carry WAHA's failures from one tick to the
    next (a daemon keeps one); without it, this tick starts with every breaker closed.
    """
    clock: Callable[[], datetime] = (lambda: now) if now else (lambda: datetime.now(UTC))
    stop = stop or threading.Event()
    breakers = breakers or Breakers(store.retry_delay)
    counts = TickCounts()
    campaigns: set[Any] = set()

    try:
        swept = store.sweep(clock())
        counts.expired, counts.unknown, counts.failed = swept.expired, swept.unknown, swept.failed
        campaigns |= _campaign_ids(swept.campaigns)

        idle = _sessions_not_working(store, waha, breakers, clock(), counts)
        while not stop.is_set() and SERVER not in breakers.open(clock()):
            paused = idle | breakers.open(clock()).keys()
            batch = store.claim(clock(), batch_size, store.of_sessions(paused) if paused else None)
            if not batch:
                break
            counts.claimed += len(batch)
            campaigns |= _campaign_ids(d.get("campaignId") for d in batch)
            _send_batch(store, waha, batch, clock, stop, breakers, counts)
    finally:
        # Even after a failure: what was settled before it must show in its campaign.
        store.rollup(campaigns, clock())
    return counts


def _sessions_not_working(
    store: Store, waha: WahaClient, breakers: Breakers, now: datetime, counts: TickCounts
) -> set[str]:
    """Ask WAHA once which sessions cannot send now; their messages are left unclaimed.

    Due messages that wait for a session (or for the whole server) say why in lastError.
    When WAHA cannot be reached or refuses the key, its breaker opens and nothing is claimed;
    another failure to list counts towards opening it, and the tick goes on.
    """
    if SERVER not in breakers.open(now):
        listed = waha.sessions()
        if isinstance(listed, Outcome):
            counts.key_rejected = listed.verdict is Verdict.REJECTED_KEY
            at_once = counts.key_rejected or listed.unreachable
            if not breakers.failed(SERVER, now, listed.reason, at_once):
                logger.warning("{}; sending without it", listed.reason)
                return set()  # a passing hiccup: each send's own answer still counts
            log = logger.error if counts.key_rejected else logger.warning
            log("nothing sent for {:g} s: {}", breakers.cooldown.total_seconds(), listed.reason)
        else:
            breakers.succeeded(SERVER)
            idle = {s["name"]: s["status"] for s in listed if s["status"] != "WORKING"}
            waiting = breakers.open(now)
            for name, status in idle.items():
                waiting[name] = f"WhatsApp session '{name}' is {status}, not WORKING"
            for name, reason in waiting.items():
                store.note_waiting(now, reason, store.of_sessions([name]))
            return set(idle)
    store.note_waiting(now, breakers.open(now)[SERVER])
    return set()


def _campaign_ids(values: Iterable[Any]) -> set[Any]:
    """Campaign references that can name a campaign; anything else is not rolled up."""
    return {v for v in values if isinstance(v, ObjectId | str | int) and not isinstance(v, bool)}


def _send_batch(
    store: Store,
    waha: WahaClient,
    batch: list[Doc],
    clock: Callable[[], datetime],
    stop: threading.Event,
    breakers: Breakers,
    counts: TickCounts,
) -> None:
    lease_until = clock() + store.lease
    for position, doc in enumerate(batch):
        rest = [d["_id"] for d in batch[position:]]
        if stop.is_set():
            counts.released += store.release(rest)
            logger.info("released {} claimed message(s) not yet started", len(rest))
            return
        paused = breakers.open(clock())
        if SERVER in paused:
            counts.released += store.release(rest, paused[SERVER])
            return
        if clock() > lease_until - store.lease / 2:
            lease_until = clock() + store.lease
            store.extend(rest, lease_until)

        try:
            _send_one(store, waha, doc, clock, paused, breakers, counts)
        except WriteError as exc:
            _unwritable(store, doc, exc, clock(), counts)


def _send_one(
    store: Store,
    waha: WahaClient,
    doc: Doc,
    clock: Callable[[], datetime],
    paused: dict[str, str],
    breakers: Breakers,
    counts: TickCounts,
) -> None:
    ready = prepare(doc, store)
    if isinstance(ready, str):
        store.finish(doc["_id"], FAILED, ready, clock())
        counts.failed += 1
        logger.warning("message {} failed: {}", doc["_id"], ready)
        return
    if ready.session in paused:
        store.release([doc["_id"]], paused[ready.session], clock() + store.retry_delay)
        counts.retried += 1
        return
    # One WAHA message id per message, kept across retries: WAHA delivers an id only once.
    send_id = doc.get("sendId") if isinstance(doc.get("sendId"), str) else None
    if not send_id:
        got = waha.new_message_id(ready.session)
        if isinstance(got, Outcome):
            _record(store, doc, ready, got, clock(), breakers, counts)
            return
        send_id = got
    if not store.start_sending(doc["_id"], clock(), send_id):
        store.release([doc["_id"]])
        logger.warning("message {} was deleted or taken over meanwhile; skipped", doc["_id"])
        return

    outcome = waha.send_text(ready.session, ready.chat_id, ready.text, send_id)
    if outcome.ambiguous and not send_id:
        outcome = Outcome(
            Verdict.UNKNOWN,
            f"{outcome.reason}. WhatsApp may have the message, and this WAHA cannot "
            "pre-generate message ids, so it was not sent again: check the chat before "
            "resending.",
        )
    _record(store, doc, ready, outcome, clock(), breakers, counts)


def _unwritable(store: Store, doc: Doc, exc: WriteError, now: datetime, counts: TickCounts) -> None:
    """MongoDB refuses to update this document as it is (a field of the wrong type, a schema
    validator): it ends on its own, and the rest of the tick goes on."""
    reason = f"MongoDB refused to update this message: {str(exc)[:200]}"
    status = FAILED
    try:
        current = store.messages.find_one({"_id": doc["_id"]}, {"status": 1}) or {}
        status = UNKNOWN if current.get("status") == SENDING else FAILED  # sent, perhaps
        store.finish(doc["_id"], status, reason, now)
    except PyMongoError as again:
        reason += f"; and it could not be marked {status}: {str(again)[:200]}"
    if status == UNKNOWN:
        counts.unknown += 1
    else:
        counts.failed += 1
    logger.error("message {} {}: {}", doc["_id"], status, reason)


def _record(
    store: Store,
    doc: Doc,
    ready: Ready,
    outcome: Outcome,
    now: datetime,
    breakers: Breakers,
    counts: TickCounts,
) -> None:
    message_id = doc["_id"]
    if outcome.verdict is Verdict.SENT:
        if not store.mark_sent(message_id, outcome.message_id, now):
            logger.error(
                "message {} was sent, but its document had changed: not recorded", message_id
            )
        counts.sent += 1
        scheduled = doc.get("scheduledAt")
        if isinstance(scheduled, datetime):
            counts.lateness.append((now - scheduled).total_seconds())
        logger.debug("message {} sent to {} via {}", message_id, ready.chat_id, ready.session)
    elif outcome.verdict is Verdict.FAILED:
        store.finish(message_id, FAILED, outcome.reason, now)
        counts.failed += 1
        logger.warning("message {} failed: {}", message_id, outcome.reason)
    elif outcome.verdict is Verdict.UNKNOWN:
        store.finish(message_id, UNKNOWN, outcome.reason, now)
        counts.unknown += 1
        logger.warning("message {} outcome unknown: {}", message_id, outcome.reason)
    elif outcome.verdict is Verdict.REJECTED_KEY:
        # Not the message's fault: give it back untouched.
        store.release([message_id], outcome.reason)
        counts.released += 1
        counts.key_rejected = True
    else:
        retry_at = now + store.retry_delay
        store.release([message_id], outcome.reason, retry_at, in_doubt=outcome.ambiguous)
        counts.retried += 1
        logger.info("message {} will be retried: {}", message_id, outcome.reason)
    _feed_breaker(breakers, ready.session, outcome, now)


def _feed_breaker(breakers: Breakers, session: str, outcome: Outcome, now: datetime) -> None:
    """What an answer says about the session, or about the whole WAHA server."""
    if outcome.verdict is Verdict.SENT:
        breakers.succeeded(session)
        return
    if outcome.verdict is Verdict.FAILED and (outcome.status_code or 0) < 500:
        return  # WAHA refused this message (400, ...): the session is fine
    # A refused key, or no connection at all: nothing else would get through either.
    server = outcome.verdict is Verdict.REJECTED_KEY or outcome.unreachable
    key = SERVER if server else session
    # WAHA said the session is not started (404) or not WORKING (422): no need to ask again.
    at_once = server or outcome.status_code in (404, 422)
    if breakers.failed(key, now, outcome.reason, at_once):
        log = logger.error if outcome.verdict is Verdict.REJECTED_KEY else logger.warning
        what = "WAHA" if server else f"session '{session}'"
        log("{} paused for {:g} s: {}", what, breakers.cooldown.total_seconds(), outcome.reason)


def prepare(doc: Doc, store: Store) -> Ready | str:
    """Check a message against the data contract: what to send, or why it cannot be sent."""
    text = doc.get("content")
    if not isinstance(text, str) or not text.strip():
        return "The message has no text to send (content is empty or missing)."
    chat_id = normalise_chat_id(doc.get("chatId"))
    if chat_id is None:
        return f"chatId {_show(doc.get('chatId'))} is not a WhatsApp id or phone number."
    session = doc.get("session")
    if isinstance(session, str) and session.strip():
        return Ready(session.strip(), chat_id, text)
    session_id = doc.get("sessionId")
    if session_id is None or session_id == "":
        return "The message names no WhatsApp session (set session or sessionId)."
    if not isinstance(session_id, ObjectId | str | int) or isinstance(session_id, bool):
        return f"sessionId {_show(session_id)} is not an id (an ObjectId or a string)."
    name = store.session_name(session_id)
    if name is None:
        return (
            f"sessionId {_show(session_id)} matches no WhatsApp session document with a name "
            f"in {store.sessions.name}."
        )
    return Ready(name, chat_id, text)


def normalise_chat_id(raw: object) -> str | None:
    """A WAHA chat id, or None. Bare phone numbers become `<digits>@c.us`."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    value = raw.strip()
    if value.endswith("@s.whatsapp.net"):
        value = value.removesuffix("@s.whatsapp.net") + "@c.us"
    if CHAT_ID.match(value):
        return value
    if PHONE.match(value):
        digits = re.sub(r"\D", "", value)
        if 7 <= len(digits) <= 15:
            return f"{digits}@c.us"
    return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
