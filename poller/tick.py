"""One tick: settle what is late or abandoned, claim what is due, send it, roll campaigns up."""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from loguru import logger
from pymongo.errors import PyMongoError, WriteError

from poller.breaker import SERVER, Breakers
from poller.pacing import Pacing
from poller.store import BUSY, CAPPED, FAILED, SENDING, UNKNOWN, Doc, Store
from poller.waha import Outcome, Verdict, WahaClient

# WhatsApp ids WAHA can send to: a person (c.us, lid), a group (g.us), a channel (newsletter).
CHAT_ID = re.compile(
    r"^(?:\d{5,20}@c\.us|\d{5,25}@lid|\d{5,20}(?:-\d{5,20})?@g\.us|\d{5,25}@newsletter)$"
)
# A bare phone number, international format; spaces, dashes, dots and brackets are ignored.
PHONE = re.compile(r"^\+?[\d\s().\-]+$")
MIME_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")
# Sessions sent for side by side in one tick; more wait for the next round.
MAX_PARALLEL_SESSIONS = 32


@dataclass
class TickCounts:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0
    unknown: int = 0
    cancelled: int = 0
    # Held back by the daily cap or the quiet hours, until sending is allowed again.
    held: int = 0
    released: int = 0
    key_rejected: bool = False
    # sentAt - scheduledAt of each message sent, in seconds (for the lateness metric).
    lateness: list[float] = field(default_factory=list)
    # When there is something to send next: the next message's scheduled time, or a paced
    # session's next turn. `poller run` ticks again then.
    next_at: datetime | None = None

    def totals(self) -> dict[str, int | bool]:
        """The counts alone, as written to the heartbeat and returned by run_once()."""
        return {k: v for k, v in asdict(self).items() if k not in ("lateness", "next_at")}

    def add(self, other: TickCounts) -> None:
        """Add the counts of `other` (one session's sends, made in parallel) to these."""
        for name, value in other.totals().items():
            if name == "key_rejected":
                self.key_rejected = self.key_rejected or bool(value)
            else:
                setattr(self, name, getattr(self, name) + value)
        self.lateness.extend(other.lateness)

    def summary(self) -> str:
        return (
            f"claimed={self.claimed} sent={self.sent} retried={self.retried} "
            f"failed={self.failed} expired={self.expired} unknown={self.unknown} "
            f"cancelled={self.cancelled} held={self.held}"
        )


@dataclass(frozen=True)
class Media:
    file: dict[str, str]  # WAHA's `file`: mimetype, url or data, filename
    caption: str | None
    image: bool  # image/* goes through /api/sendImage, anything else through /api/sendFile


@dataclass(frozen=True)
class Ready:
    session: str
    chat_id: str
    text: str  # the caption, for media
    media: Media | None = None


@dataclass(frozen=True)
class _Tick:
    """What every step of one tick works with."""

    store: Store
    waha: WahaClient
    clock: Callable[[], datetime]
    stop: threading.Event
    breakers: Breakers
    pacing: Pacing
    # The `dailyCap` of each session document that sets one, read once a tick.
    caps: dict[str, Any] = field(default_factory=dict)


def tick(
    store: Store,
    waha: WahaClient,
    batch_size: int,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    breakers: Breakers | None = None,
    pacing: Pacing | None = None,
) -> TickCounts:
    """Run one tick and return its counts.

    `now` fixes the clock (tests, replays); without it every step reads the wall clock.
    `stop` is checked between messages: once set, the message in flight finishes and the
    claims not yet started are released. `breakers` carry WAHA's failures from one tick to the
    next (a daemon keeps one); without it, this tick starts with every breaker closed.
    `pacing` spaces each session's messages and sets the cap, quiet hours and typing; without
    it, messages go out as fast as WAHA takes them.
    """
    clock: Callable[[], datetime] = (lambda: now) if now else (lambda: datetime.now(UTC))
    t = _Tick(
        store,
        waha,
        clock,
        stop or threading.Event(),
        breakers or Breakers(store.retry_delay),
        pacing or Pacing(),
    )
    counts = TickCounts()
    campaigns: set[Any] = set()

    try:
        swept = store.sweep(clock())
        counts.expired, counts.unknown, counts.failed = swept.expired, swept.unknown, swept.failed
        campaigns |= _campaign_ids(swept.campaigns)
        counts.cancelled, cancelled = store.cancel(clock())
        campaigns |= _campaign_ids(cancelled)
        t.caps.update(store.daily_caps())

        idle = _sessions_not_working(t, counts)
        skip = _keep_waiting(t, idle)  # also while WAHA is paused: a paused campaign waits
        while not t.stop.is_set() and SERVER not in t.breakers.open(clock()):
            if _quiet(t, counts):
                break
            batch = store.claim(clock(), batch_size, skip, one_per_session=t.pacing.paced)
            if not batch:
                break
            counts.claimed += len(batch)
            campaigns |= _campaign_ids(d.get("campaignId") for d in batch)
            released = counts.released
            _send_all(t, batch, counts)
            if counts.released - released == len(batch):
                break  # every session's turn is taken by another poller: nothing to do now
            skip = _keep_waiting(t, idle)
        later = [store.next_due(clock())]
        if t.pacing.paced:
            later.extend(store.turns(clock()).values())
        counts.next_at = min((at for at in later if at is not None), default=None)
    finally:
        # Even after a failure: what was settled before it must show in its campaign.
        store.rollup(campaigns, clock())
    return counts


def _keep_waiting(t: _Tick, idle: set[str]) -> Doc | None:
    """Hold back the messages that wait for their session's turn or for a paused campaign
    (the poller's own doing: that wait does not make them late), and return what the claim
    must leave alone: those, and the sessions that cannot send now."""
    now = t.clock()
    blocked = idle | t.breakers.open(now).keys()
    turns = t.store.turns(now).keys()
    paused = t.store.paused_campaigns()
    skip = []
    if turns - blocked and SERVER not in blocked:
        t.store.hold(now, t.store.of_sessions(turns - blocked))
    if paused:
        skip.append({"campaignId": {"$in": paused}})
        t.store.hold(now, skip[0])
    if blocked | turns:
        skip.append(t.store.of_sessions(blocked | turns))
    return {"$or": skip} if skip else None


def _quiet(t: _Tick, counts: TickCounts) -> bool:
    """Inside the quiet hours: hold every due message until they end."""
    until = t.pacing.quiet_until(t.clock())
    if until is None:
        return False
    reason = (
        f"Waiting for the end of the quiet hours ({t.pacing.describe_quiet()}) at "
        f"{until.astimezone(t.pacing.zone):%Y-%m-%d %H:%M}."
    )
    counts.held += t.store.hold(t.clock(), {}, until, reason)
    return True


def _sessions_not_working(t: _Tick, counts: TickCounts) -> set[str]:
    """Ask WAHA once which sessions cannot send now; their messages are left unclaimed.

    Due messages that wait for a session (or for the whole server) say why in lastError.
    When WAHA cannot be reached or refuses the key, its breaker opens and nothing is claimed;
    another failure to list counts towards opening it, and the tick goes on.
    """
    store, breakers, now = t.store, t.breakers, t.clock()
    if SERVER not in breakers.open(now):
        listed = t.waha.sessions()
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


def _send_all(t: _Tick, batch: list[Doc], counts: TickCounts) -> None:
    """Send each session's messages in order, the sessions side by side: one session's
    typing pauses and gaps do not hold up another's."""
    lease_until = t.clock() + t.store.lease  # as claimed, whenever a session's turn comes
    by_session: dict[str, list[Doc]] = {}
    for doc in batch:
        by_session.setdefault(repr((doc.get("session"), doc.get("sessionId"))), []).append(doc)
    if len(by_session) == 1:
        _send_batch(t, batch, lease_until, counts)
        return
    with ThreadPoolExecutor(min(len(by_session), MAX_PARALLEL_SESSIONS)) as pool:
        futures = [
            pool.submit(_send_batch_apart, t, docs, lease_until) for docs in by_session.values()
        ]
    errors = []
    for future in futures:
        try:
            counts.add(future.result())
        except Exception as exc:  # re-raised below, once every session's counts are in
            errors.append(exc)
    if errors:
        raise errors[0]


def _send_batch_apart(t: _Tick, batch: list[Doc], lease_until: datetime) -> TickCounts:
    counts = TickCounts()
    _send_batch(t, batch, lease_until, counts)
    return counts


def _send_batch(t: _Tick, batch: list[Doc], lease_until: datetime, counts: TickCounts) -> None:
    store = t.store
    for position, doc in enumerate(batch):
        rest = [d["_id"] for d in batch[position:]]
        if t.stop.is_set():
            counts.released += store.release(rest)
            logger.info("released {} claimed message(s) not yet started", len(rest))
            return
        paused = t.breakers.open(t.clock())
        if SERVER in paused:
            counts.released += store.release(rest, paused[SERVER])
            return
        if t.clock() > lease_until - store.lease / 2:
            lease_until = t.clock() + store.lease
            store.extend(rest, lease_until)

        try:
            _send_one(t, doc, paused, counts)
        except WriteError as exc:
            _unwritable(store, doc, exc, t.clock(), counts)


def _send_one(t: _Tick, doc: Doc, paused: dict[str, str], counts: TickCounts) -> None:
    store = t.store
    ready = prepare(doc, store)
    if isinstance(ready, str):
        store.finish(doc["_id"], FAILED, ready, t.clock())
        counts.failed += 1
        logger.warning("message {} failed: {}", doc["_id"], ready)
        return
    if ready.session in paused:
        store.release([doc["_id"]], paused[ready.session], t.clock() + store.retry_delay)
        counts.retried += 1
        return
    cap = daily_cap(t, ready.session)
    if isinstance(cap, str):
        store.release([doc["_id"]], cap, t.clock() + store.retry_delay)
        counts.retried += 1
        logger.warning("message {} waits: {}", doc["_id"], cap)
        return
    turn = None
    if t.pacing.paced or cap is not None:
        now = t.clock()
        got = store.reserve(ready.session, now, t.pacing.day(now).isoformat(), cap)
        if got == BUSY:  # another replica is sending for this session: back to the queue
            counts.released += store.release([doc["_id"]])
            return
        if got == CAPPED:
            assert cap is not None
            _hold_capped(t, doc, ready.session, cap, counts)
            return
        turn = _Turn(ready.session)
    try:
        _deliver(t, doc, ready, turn, counts)
    finally:
        if turn is not None:  # even after an error: a request that went out is paced
            gap = t.pacing.gap() if turn.sent else timedelta()
            store.end_turn(turn.session, t.clock() + gap, turn.sent)


def _hold_capped(t: _Tick, doc: Doc, session: str, cap: int, counts: TickCounts) -> None:
    now = t.clock()
    until = t.pacing.next_day(now)
    reason = (
        f"Waiting: WhatsApp session '{session}' sent its daily cap of {cap} message(s); it "
        f"sends again from {until.astimezone(t.pacing.zone):%Y-%m-%d %H:%M} "
        f"({t.pacing.zone.key})."
    )
    t.store.release([doc["_id"]], reason, held_until=until)
    counts.held += 1 + t.store.hold(now, t.store.of_sessions([session]), until, reason)
    logger.info("session '{}' reached its daily cap of {}: held until {}", session, cap, until)


@dataclass
class _Turn:
    """The session's turn to send, which this poller holds in `pollerpacing`."""

    session: str
    sent: bool = False  # a send request went out: the gap follows, and it counts for the cap


def _deliver(t: _Tick, doc: Doc, ready: Ready, turn: _Turn | None, counts: TickCounts) -> None:
    """Send one claimed message and record the outcome."""
    store, waha = t.store, t.waha
    send_id = None
    if ready.media is None:
        # One WAHA message id per message, kept across retries: WAHA delivers an id only once.
        send_id = doc.get("sendId") if isinstance(doc.get("sendId"), str) else None
        if not send_id:
            got = waha.new_message_id(ready.session)
            if isinstance(got, Outcome):
                _record(t, doc, ready, got, counts)
                return
            send_id = got
    if t.pacing.typing and not _type(t, ready):
        counts.released += store.release([doc["_id"]])  # stopped while "typing"
        return
    if turn is not None and not store.fence(turn.session, t.clock()):
        counts.released += store.release([doc["_id"]])  # too slow: another poller has the turn
        logger.warning("message {}: the turn of session '{}' lapsed", doc["_id"], turn.session)
        return
    if not store.start_sending(doc["_id"], t.clock(), send_id):
        store.release([doc["_id"]])
        logger.warning(
            "message {} was deleted, cancelled or taken over meanwhile; skipped", doc["_id"]
        )
        return

    if turn is not None:
        turn.sent = True
    if ready.media is None:
        outcome = waha.send_text(ready.session, ready.chat_id, ready.text, send_id)
    else:
        outcome = waha.send_media(
            ready.session, ready.chat_id, ready.media.file, ready.media.caption, ready.media.image
        )
    if outcome.ambiguous and not send_id:
        why = (
            "WAHA takes no message id for media"
            if ready.media
            else "this WAHA cannot pre-generate message ids"
        )
        outcome = Outcome(
            Verdict.UNKNOWN,
            f"{outcome.reason}. WhatsApp may have the message, and {why}, so it was not sent "
            "again: check the chat before resending.",
        )
    _record(t, doc, ready, outcome, counts)


def _type(t: _Tick, ready: Ready) -> bool:
    """Mark the chat seen and show "typing..." for a while, as a person would before sending.

    Best effort: when WAHA refuses a step, the text is sent without it (its own answer then
    says what is wrong). False when the poller was told to stop during the pause.
    """
    for path in ("/api/sendSeen", "/api/startTyping"):
        outcome = t.waha.chat_action(path, ready.session, ready.chat_id)
        if outcome.verdict is not Verdict.SENT:
            logger.debug("no typing for {}: {} failed: {}", ready.chat_id, path, outcome.reason)
            return True
    stopped = t.stop.wait(t.pacing.typing_pause(ready.text))
    t.waha.chat_action("/api/stopTyping", ready.session, ready.chat_id)
    return not stopped


def daily_cap(t: _Tick, session: str) -> int | str | None:
    """The session's daily cap: its document's `dailyCap`, else DAILY_CAP (None: no cap).
    A `dailyCap` of 0, or one that is not a whole number, is a reason not to send."""
    if session not in t.caps:
        return t.pacing.daily_cap
    value = t.caps[session]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    where = f"WhatsApp session '{session}' in {t.store.sessions.name}"
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
        if value == 0:
            return f"dailyCap of {where} is 0: it sends nothing until it is raised."
    return (
        f"dailyCap {_show(value)} of {where} is not a whole number: nothing is sent for this "
        "session until it is fixed."
    )


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


def _record(t: _Tick, doc: Doc, ready: Ready, outcome: Outcome, counts: TickCounts) -> None:
    store, now, message_id = t.store, t.clock(), doc["_id"]
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
    _feed_breaker(t.breakers, ready.session, outcome, now)


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
    media = None
    if doc.get("media") is not None:
        found = _media(doc["media"], text)
        if isinstance(found, str):
            return found
        media, text = found, found.caption or ""
    elif not isinstance(text, str) or not text.strip():
        return "The message has no text to send (content is empty or missing)."
    chat_id = normalise_chat_id(doc.get("chatId"))
    if chat_id is None:
        return f"chatId {_show(doc.get('chatId'))} is not a WhatsApp id or phone number."
    session = doc.get("session")
    if isinstance(session, str) and session.strip():
        return Ready(session.strip(), chat_id, text, media)
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
    return Ready(name, chat_id, text, media)


def _media(raw: object, content: object) -> Media | str:
    """WAHA's `file` and caption from a message's `media`, or why it cannot be sent."""
    shape = "{url or data, mimetype, filename, caption}"
    if not isinstance(raw, dict):
        return f"media must be an object {shape}, but it is {_show(raw)}."
    mimetype = raw.get("mimetype")
    if not isinstance(mimetype, str) or not MIME_TYPE.match(mimetype.strip()):
        return f"media.mimetype {_show(mimetype)} is not a MIME type such as image/jpeg."
    url, data = raw.get("url"), raw.get("data")
    if (url is None) == (data is None):
        return "media needs either a url or base64 data (exactly one of them)."
    file = {"mimetype": mimetype.strip()}
    if url is not None:
        if not isinstance(url, str) or not re.match(r"^https?://\S+$", url.strip()):
            return f"media.url {_show(url)} is not an http:// or https:// URL."
        file["url"] = url.strip()
    else:
        try:
            if not isinstance(data, str) or not data:
                raise ValueError
            base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error):
            return "media.data is not base64 (plain, without a data: prefix)."
        file["data"] = data
    for name in ("filename", "caption"):
        if raw.get(name) is not None and not isinstance(raw.get(name), str):
            return f"media.{name} must be text, but it is {_show(raw.get(name))}."
    if raw.get("filename"):
        file["filename"] = raw["filename"]
    caption = raw.get("caption") or (content if isinstance(content, str) else None)
    caption = caption if caption and caption.strip() else None
    return Media(file, caption, file["mimetype"].lower().startswith("image/"))


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
