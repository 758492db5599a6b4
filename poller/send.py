"""Sending a claimed batch: each session's messages in order, the sessions side by side; for each
message its turn, its WAHA message id, typing, the send, and its outcome on the document."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger
from pymongo.errors import PyMongoError, WriteError

from poller import lanes
from poller.context import Context, daily_cap
from poller.contract import (
    CANCELLED,
    FAILED,
    PAUSED,
    SENDING,
    UNKNOWN,
    Ready,
    prepare,
    session_name,
)
from poller.counts import TickCounts
from poller.gate import Gate
from poller.plan import cap_reason
from poller.servers import lost, named, server_key
from poller.settle import CANCELLED_DOUBT, CANCELLED_REASON
from poller.store import BUSY, CAPPED, Doc, Store
from poller.store.optouts import OPTED_OUT
from poller.waha import Outcome, Verdict, WahaClient

OPTED_OUT_DOUBT = (
    "Not sent again: the recipient opted out, but an earlier attempt may have reached "
    "WhatsApp. Check the chat."
)
# Sessions sent for side by side in one tick; more wait for the next round.
MAX_PARALLEL_SESSIONS = 32


def send_all(
    t: Context, batch: list[Doc], names: dict[str, str], gate: Gate, counts: TickCounts
) -> None:
    """Send each session's messages in order, the sessions side by side: one session's
    typing pauses and gaps do not hold up another's. `names`: session names by sessionId;
    `gate`: what may stop each message, as read when the batch was claimed."""
    lease_until = t.clock() + t.store.timings.lease  # as claimed, whenever a session's turn comes
    by_session: dict[str | None, list[Doc]] = {}
    for doc in batch:
        by_session.setdefault(session_name(doc, names), []).append(doc)
    if len(by_session) == 1:
        _send_batch(t, batch, names, gate, lease_until, counts)
        return
    with ThreadPoolExecutor(min(len(by_session), MAX_PARALLEL_SESSIONS)) as pool:
        futures = [
            pool.submit(_send_batch_apart, t, docs, names, gate, lease_until)
            for docs in by_session.values()
        ]
    errors = []
    for future in futures:
        try:
            counts.add(future.result())
        except Exception as exc:  # re-raised below, once every session's counts are in
            errors.append(exc)
    if errors:
        raise errors[0]


def _send_batch_apart(
    t: Context, batch: list[Doc], names: dict[str, str], gate: Gate, lease_until: datetime
) -> TickCounts:
    counts = TickCounts()
    _send_batch(t, batch, names, gate, lease_until, counts)
    return counts


def _send_batch(
    t: Context,
    batch: list[Doc],
    names: dict[str, str],
    gate: Gate,
    lease_until: datetime,
    counts: TickCounts,
) -> None:
    messages, lease = t.store.messages, t.store.timings.lease
    for position, doc in enumerate(batch):
        rest = [d["_id"] for d in batch[position:]]
        if t.stop.is_set():
            counts.released += messages.release(rest)
            logger.info("released {} claimed message(s) not yet started", len(rest))
            return
        # A breaker that opened during this tick (the batch is one session's): no more requests.
        held = lanes.breaker_open(t, session_name(doc, names) or "", t.breakers.open(t.clock()))
        if held is not None:
            counts.released += messages.release(rest, held)
            return
        if t.clock() > lease_until - lease / 2:
            lease_until = t.clock() + lease
            messages.extend(rest, lease_until)
        if gate.stale():
            gate = Gate.read(t.store, batch[position:], names)
        try:
            _send_one(t, doc, names, gate, counts)
        except WriteError as exc:
            _unwritable(t.store, doc, exc, t.clock(), counts)


def _send_one(t: Context, doc: Doc, names: dict[str, str], gate: Gate, counts: TickCounts) -> None:
    messages = t.store.messages
    ready = prepare(doc, names, t.store.sessions.collection.name)
    if isinstance(ready, str):
        messages.finish(doc["_id"], FAILED, ready, t.clock(), counts.stats)
        counts.failed += 1
        logger.warning("message {} failed: {}", doc["_id"], ready)
        return
    if _stopped_campaign(t, doc, gate, counts):
        return
    server = t.routes.server_of(ready.session)
    if server is None:  # claimed as taken over, or its server's listing was not known
        reason = t.routes.why_not(ready.session)
        counts.released += messages.release([doc["_id"]], reason, t.clock() + t.store.timings.retry)
        return
    if _moved_in_doubt(t, doc, ready, server, counts):
        return
    if gate.opted_out_of(ready.session, ready.chat_id, doc):
        _cancel(t, doc, OPTED_OUT, OPTED_OUT_DOUBT, counts)
        logger.info("message {} not sent: {} opted out", doc["_id"], ready.chat_id)
        return
    cap = daily_cap(t, ready.session)
    if isinstance(cap, str):
        messages.release([doc["_id"]], cap, t.clock() + t.store.timings.retry)
        counts.held += 1
        logger.warning("message {} waits: {}", doc["_id"], cap)
        return
    turn = None
    if t.pacing.paced or cap is not None:
        now = t.clock()
        got = t.store.turns.reserve(ready.session, now, t.pacing.day(now).isoformat(), cap)
        if got == BUSY:  # another replica is sending for this session: back to the queue
            counts.released += messages.release([doc["_id"]])
            return
        if got == CAPPED:
            assert cap is not None
            _hold_capped(t, doc, ready.session, cap, counts)
            return
        turn = _Turn(ready.session, now)
    try:
        _deliver(t, doc, ready, _Via(server, t.servers.clients[server]), turn, counts)
    finally:
        if turn is not None:  # even after an error: a request that went out is paced
            # The plan spaces the sends at random; the turn keeps at least the shortest gap
            # between two of them, whatever the plan (a lane catching up, replicas).
            gap = timedelta(seconds=t.pacing.gap_min) if turn.sent else timedelta()
            t.store.turns.end(turn.session, t.clock() + gap, turn.sent)


def _moved_in_doubt(t: Context, doc: Doc, ready: Ready, server: str, counts: TickCounts) -> bool:
    """A send that may have reached WhatsApp through one server is retried through that server
    only, under its message id: WAHA delivers an id once, but each server only knows its own.
    When the session has moved to another server, the message ends `unknown` instead."""
    before = doc.get("wahaServer", t.servers.sole)  # not recorded: sent with one server only
    if doc.get("inDoubt") is not True or before == server:
        return False
    through = f"WAHA server '{before}'" if before else "a WAHA server not recorded"
    reason = (
        f"The last attempt through {through} may have reached WhatsApp, and "
        f"session '{ready.session}' is now on WAHA server '{server}': it was not sent again, "
        "so as not to deliver it twice. Check the chat before resending."
    )
    t.store.messages.finish(doc["_id"], UNKNOWN, reason, t.clock(), counts.stats)
    counts.unknown += 1
    logger.warning("message {} outcome unknown: {}", doc["_id"], reason)
    return True


def _stopped_campaign(t: Context, doc: Doc, gate: Gate, counts: TickCounts) -> bool:
    """Whether the message's campaign was cancelled or paused since the claim: it then ends
    `cancelled`, or goes back to wait, in its place, for the campaign to resume."""
    status = gate.campaign_status(doc)
    if status == CANCELLED:
        _cancel(t, doc, CANCELLED_REASON, CANCELLED_DOUBT, counts)
        return True
    if status == PAUSED:
        t.store.campaigns.mark_held(doc["campaignId"], t.clock())
        counts.released += t.store.messages.release([doc["_id"]])
        return True
    return False


def _cancel(t: Context, doc: Doc, reason: str, doubt: str, counts: TickCounts) -> None:
    """End a claimed message that must not be sent: `cancelled` with `reason`, or `unknown`
    with `doubt` where an earlier attempt may have reached WhatsApp (`inDoubt`)."""
    if doc.get("inDoubt") is True:
        t.store.messages.finish(doc["_id"], UNKNOWN, doubt, t.clock(), counts.stats)
        counts.unknown += 1
    else:
        t.store.messages.finish(doc["_id"], CANCELLED, reason, t.clock(), counts.stats)
        counts.cancelled += 1


def _hold_capped(t: Context, doc: Doc, session: str, cap: int, counts: TickCounts) -> None:
    until = t.pacing.next_day(t.clock())
    reason = cap_reason(t.pacing, session, cap, until)
    t.store.messages.release([doc["_id"]], reason)
    counts.held += lanes.replan(t, session, until, reason)
    logger.info("session '{}' reached its daily cap of {}: held until {}", session, cap, until)


@dataclass(frozen=True)
class _Via:
    """The WAHA server a message goes through."""

    name: str
    waha: WahaClient


@dataclass
class _Turn:
    """The session's turn to send, which this poller holds in the pacing collection."""

    session: str
    taken: datetime  # when: it is held until `turn_hold` later
    sent: bool = False  # a send request went out: the gap follows, and it counts for the cap

    def covers_send(self, t: Context) -> bool:
        """Whether the turn as taken lasts through a send starting now, as a renewal would."""
        timings = t.store.timings
        return t.clock() + timings.fence_hold <= self.taken + timings.turn_hold


def _deliver(
    t: Context, doc: Doc, ready: Ready, via: _Via, turn: _Turn | None, counts: TickCounts
) -> None:
    """Send one claimed message through the WAHA server `via`, and record the outcome."""
    messages, waha = t.store.messages, via.waha
    send_id = None
    if ready.media is None:
        # One WAHA message id per message, kept across retries: WAHA delivers an id only once.
        send_id = doc.get("sendId") if isinstance(doc.get("sendId"), str) else None
        if not send_id:
            got = waha.new_message_id(ready.session)
            if isinstance(got, Outcome):
                _record(t, doc, ready, via.name, got, counts)
                return
            send_id = got
    if t.pacing.typing:
        refused = _type(t, ready, waha)
        if isinstance(refused, Outcome):  # the session cannot send now: nor can it type
            _record(t, doc, ready, via.name, refused, counts)
            return
        if refused:
            counts.released += messages.release([doc["_id"]])  # stopped while "typing"
            return
    if turn is not None and not (
        turn.covers_send(t) or t.store.turns.fence(turn.session, t.clock())
    ):
        counts.released += messages.release([doc["_id"]])  # too slow: another poller has it
        logger.warning("message {}: the turn of session '{}' lapsed", doc["_id"], turn.session)
        return
    if not messages.start_sending(doc["_id"], t.clock(), via.name, send_id):
        counts.released += messages.release([doc["_id"]])
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
    _record(t, doc, ready, via.name, outcome, counts)


def _type(t: Context, ready: Ready, waha: WahaClient) -> Outcome | bool:
    """Mark the chat seen and show "typing..." for a while, as a person would before sending.

    True when the poller was told to stop during the pause. WAHA's answer when the session
    (or WAHA) cannot send now: the message then waits. Any other refusal (an engine without
    chat actions) only skips the typing.
    """
    for path in ("/api/sendSeen", "/api/startTyping"):
        outcome = waha.chat_action(path, ready.session, ready.chat_id)
        if outcome.verdict in (Verdict.RETRY, Verdict.REJECTED_KEY):
            return outcome
        if outcome.verdict is not Verdict.SENT:
            logger.debug("no typing for {}: {} failed: {}", ready.chat_id, path, outcome.reason)
            return False
    stopped = t.stop.wait(t.pacing.typing_pause(ready.text))
    waha.chat_action("/api/stopTyping", ready.session, ready.chat_id)
    return stopped


def _unwritable(store: Store, doc: Doc, exc: WriteError, now: datetime, counts: TickCounts) -> None:
    """MongoDB refuses to update this document as it is (a field of the wrong type, a schema
    validator): it ends on its own, and the rest of the tick goes on."""
    reason = f"MongoDB refused to update this message: {str(exc)[:200]}"
    status = FAILED
    try:
        status = UNKNOWN if store.messages.status_of(doc["_id"]) == SENDING else FAILED
        store.messages.finish(doc["_id"], status, reason, now, counts.stats)
    except PyMongoError as again:
        reason += f"; and it could not be marked {status}: {str(again)[:200]}"
    if status == UNKNOWN:
        counts.unknown += 1
    else:
        counts.failed += 1
    logger.error("message {} {}: {}", doc["_id"], status, reason)


def _record(
    t: Context, doc: Doc, ready: Ready, server: str, outcome: Outcome, counts: TickCounts
) -> None:
    messages, now, message_id = t.store.messages, t.clock(), doc["_id"]
    counts.count_send(server, outcome.verdict.value)
    if outcome.verdict is Verdict.SENT:
        slot, scheduled = _date(doc.get("plannedAt")), _date(doc.get("scheduledAt"))
        if not messages.sent(message_id, outcome.message_id, now, counts.stats, slot):
            logger.error(
                "message {} was sent, but its document had changed: not recorded", message_id
            )
        counts.sent += 1
        planned = slot or scheduled
        if planned is not None:
            counts.lateness.append((now - planned).total_seconds())
        if slot and scheduled:
            counts.pacing_delay.append(max(0.0, (slot - scheduled).total_seconds()))
        logger.debug("message {} sent to {} via {}", message_id, ready.chat_id, ready.session)
    elif outcome.verdict is Verdict.FAILED:
        messages.finish(message_id, FAILED, outcome.reason, now, counts.stats)
        counts.failed += 1
        logger.warning("message {} failed: {}", message_id, outcome.reason)
    elif outcome.verdict is Verdict.UNKNOWN:
        messages.finish(message_id, UNKNOWN, outcome.reason, now, counts.stats)
        counts.unknown += 1
        logger.warning("message {} outcome unknown: {}", message_id, outcome.reason)
    elif outcome.verdict is Verdict.REJECTED_KEY:
        # Not the message's fault, and maybe only this poller's key: give it back untouched,
        # for a poller with the right key to send.
        messages.release([message_id])
        counts.released += 1
        if t.servers.sole is not None:  # of several servers, the others may still send
            counts.key_rejected = True
    else:
        retry_at = now + t.store.timings.retry_delay(_attempts(doc) + 1)
        messages.release([message_id], outcome.reason, retry_at, in_doubt=outcome.ambiguous)
        counts.retried += 1
        logger.info("message {} will be retried: {}", message_id, outcome.reason)
    _feed_breaker(t, server, ready.session, outcome, now)


def _attempts(doc: Doc) -> int:
    """How often the message was tried before this claim (as the poller counts them)."""
    value = doc.get("attempts")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _feed_breaker(t: Context, name: str, session: str, outcome: Outcome, now: datetime) -> None:
    """What an answer of WAHA server `name` says about the session, or about that server."""
    breakers = t.breakers
    if outcome.verdict is Verdict.SENT:
        breakers.succeeded(session)
        return
    if outcome.verdict is Verdict.FAILED and (outcome.status_code or 0) < 500:
        return  # WAHA refused this message (400, ...): the session is fine
    # A refused key, or no connection at all: nothing else would get through either.
    server = outcome.verdict is Verdict.REJECTED_KEY or outcome.unreachable
    key = server_key(name) if server else session
    # WAHA said the session is not started (404) or not WORKING (422): no need to ask again.
    at_once = server or outcome.status_code in (404, 422)
    if breakers.failed(key, now, outcome.reason, at_once):
        if server:
            lost(t.servers, name, outcome)
        log = logger.error if outcome.verdict is Verdict.REJECTED_KEY else logger.warning
        what = named(t.servers, name) if server else f"WhatsApp session '{session}'"
        seconds = breakers.cooldown.total_seconds()
        log("pausing sends through {} for the next {:g} s: {}", what, seconds, outcome.reason)


def _date(value: object) -> datetime | None:
    return value if isinstance(value, datetime) else None
