"""One tick: settle what is late or abandoned, claim what is due, send it, roll campaigns up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from poller.breaker import SERVER, Breakers
from poller.contract import session_name
from poller.counts import TickCounts
from poller.pacing import Pacing
from poller.send import Context, send_all
from poller.store import Doc, Store
from poller.store.messages import campaign_ids
from poller.store.sweep import Settled
from poller.waha import Outcome, Verdict, WahaClient

__all__ = ["TickCounts", "tick"]

# After the sends, a tick settles at most this many more chunks of a backlog of late messages;
# the rest waits for the next tick, which comes at once.
SETTLE_CHUNKS_AFTER_SENDING = 5


def tick(
    store: Store,
    waha: WahaClient,
    batch_size: int,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    breakers: Breakers | None = None,
    pacing: Pacing | None = None,
    clock: Callable[[], datetime] | None = None,
) -> TickCounts:
    """Run one tick and return its counts.

    `now` fixes the clock (tests, replays), and `clock` replaces it (a fake clock that moves);
    without either, every step reads the wall clock.
    `stop` is checked between messages: once set, the message in flight finishes and the
    claims not yet started are released. `breakers` carry WAHA's failures from one tick to the
    next (a daemon keeps one); without it, this tick starts with every breaker closed.
    `pacing` spaces each session's messages and sets the cap, quiet hours and typing; without
    it, messages go out as fast as WAHA takes them.
    """
    if clock is None:
        clock = (lambda: now) if now else (lambda: datetime.now(UTC))
    t = Context(
        store,
        waha,
        clock,
        stop or threading.Event(),
        breakers or Breakers(store.timings.retry),
        pacing or Pacing(),
    )
    started = clock()
    counts = TickCounts()
    campaigns: set[Any] = set()
    try:
        # One chunk of what is late first: a backlog of thousands never holds up the sends.
        swept = store.sweeper.sweep(started, started)
        counts.add_settled(swept)
        campaigns |= campaign_ids(swept.campaigns)
        t.caps.update(store.sessions.daily_caps())
        sendable = _sendable(t, counts)
        paused = store.campaigns.paused()
        store.messages.hold_campaigns(clock(), paused)  # also while WAHA is paused: they wait
        last_claim, cancelling = started, False
        while not t.stop.is_set() and SERVER not in t.breakers.open(clock()):
            if _quiet(t, counts):
                break
            cancelled = store.campaigns.cancel(clock())  # before each claim, not once a tick
            counts.add_settled(cancelled)
            campaigns |= campaign_ids(cancelled.campaigns)
            cancelling = cancelled.more
            last_claim = clock()
            choice = _Choice(t, sendable, last_claim, {str(c) for c in paused})
            batch = store.messages.claim(last_claim, started, batch_size, choice.choose)
            choice.apply()
            if not batch:
                break
            counts.claimed += len(batch)
            campaigns |= campaign_ids(d.get("campaignId") for d in batch)
            released = counts.released
            send_all(t, batch, choice.names, counts)
            paused = store.campaigns.paused()  # for the next round: one paused meanwhile
            if counts.released - released == len(batch):
                break  # every session's turn is taken by another poller: nothing to do now
        swept = _settle_backlog(t, started, swept, counts, campaigns)
        counts.next_at = _next_at(t, started, last_claim, swept.more or cancelling)
    finally:
        # Even after a failure: what was settled before it must show in its campaign. Open
        # campaigns no tick touched are recounted now and then (the web app deletes messages).
        campaigns |= set(store.campaigns.to_recount(clock()))
        store.campaigns.rollup(campaigns, clock())
    return counts


def _settle_backlog(
    t: Context, started: datetime, swept: Settled, counts: TickCounts, campaigns: set[Any]
) -> Settled:
    """Settle a few more chunks of a backlog of late messages, after the sends."""
    for _ in range(SETTLE_CHUNKS_AFTER_SENDING):
        if not swept.more or t.stop.is_set():
            break
        swept = t.store.sweeper.sweep(t.clock(), started)
        counts.add_settled(swept)
        campaigns |= campaign_ids(swept.campaigns)
    return swept


def _next_at(t: Context, started: datetime, last_claim: datetime, more: bool) -> datetime | None:
    """When to tick again: at once while messages are left to settle (`more`); else when the next
    message comes due after the last claim read (now, if one came due since), or a paced
    session's turn comes that was taken after this tick started (now, if it passed already)."""
    if t.stop.is_set():
        return None
    now = t.clock()
    later = [t.store.messages.next_due(last_claim, now + t.store.timings.tick_interval)]
    if more:
        later.append(now)
    if t.pacing.paced:
        later.extend(t.store.turns.waiting(started).values())
    return min((at for at in later if at is not None), default=None)


@dataclass
class _Choice:
    """Which due messages one claim round takes, and what it does with the others: messages of
    a session that cannot send now wait (lastError says why); messages of a session waiting for
    its paced turn are held (that wait never makes them late); messages of a paused campaign
    are left to the tick, which holds them too."""

    t: Context
    # The sessions WAHA can send for now; None when its list is not known (then every session).
    sendable: dict[str, str | None] | None
    now: datetime
    paused: set[str]  # paused campaigns, by id as text: their messages are held by the tick
    names: dict[str, str] = field(default_factory=dict)  # session names by sessionId
    busy: set[str] = field(default_factory=set)  # sessions waiting for their turn
    blocked: dict[str, str] = field(default_factory=dict)  # sessions whose breaker is open
    picked: set[str | None] = field(default_factory=set)
    held: list[Any] = field(default_factory=list)
    waiting: dict[str, list[Any]] = field(default_factory=dict)  # reason -> ids

    def __post_init__(self) -> None:
        if self.t.pacing.paced:
            self.busy = set(self.t.store.turns.waiting(self.now))
        self.blocked = dict(self.t.breakers.open(self.now))

    def choose(self, page: list[Doc], room: int) -> list[Any]:
        self.names.update(self.t.store.sessions.names(page))
        chosen: list[Any] = []
        for doc in page:
            if len(chosen) >= room:
                break
            if str(doc.get("campaignId")) in self.paused:
                continue
            session = session_name(doc, self.names)
            why = self._why_not(session)
            if why is not None:
                self.waiting.setdefault(why, []).append(doc["_id"])
                continue
            if session is not None and session in self.busy:
                self.held.append(doc["_id"])
                continue
            if session is not None and self.t.pacing.paced and session in self.picked:
                continue  # one message per session and turn: the next waits for the next turn
            self.picked.add(session)
            chosen.append(doc["_id"])
        return chosen

    def _why_not(self, session: str | None) -> str | None:
        """Why `session` cannot send now, or None when it can (or the message names none:
        sending it fails it with a reason)."""
        if session is None:
            return None
        if session in self.blocked:
            return self.blocked[session]
        if self.sendable is None:
            return None
        if session not in self.sendable:
            listed = ", ".join(sorted(self.sendable)) or "none"
            return (
                f"Waiting: WAHA has no WhatsApp session '{session}' (its sessions: {listed}). "
                "Create or rename the session on WAHA, or fix the message's session."
            )
        return self.sendable[session]

    def apply(self) -> None:
        """Hold and annotate what this round left."""
        messages = self.t.store.messages
        messages.hold(self.now, self.held)
        for reason, ids in self.waiting.items():
            messages.note_waiting(self.now, reason, ids)


def _sendable(t: Context, counts: TickCounts) -> dict[str, str | None] | None:
    """Ask WAHA once which sessions it has: each listed session, with why it cannot send now
    (None when it is WORKING). None when the list is not known.

    When WAHA cannot be reached or refuses the key, its breaker opens and nothing is claimed;
    another failure to list counts towards opening it, and the tick goes on.
    """
    breakers, now = t.breakers, t.clock()
    if SERVER not in breakers.open(now):
        listed = t.waha.sessions()
        if not isinstance(listed, Outcome):
            breakers.succeeded(SERVER)
            counts.sessions = listed
            return {
                s["name"]: None
                if s["status"] == "WORKING"
                else f"WhatsApp session '{s['name']}' is {s['status']}, not WORKING"
                for s in listed
            }
        counts.key_rejected = listed.verdict is Verdict.REJECTED_KEY
        at_once = counts.key_rejected or listed.unreachable
        if not breakers.failed(SERVER, now, listed.reason, at_once):
            logger.warning("{}; sending without it", listed.reason)
            return None  # a passing hiccup: each send's own answer still counts
        log = logger.error if counts.key_rejected else logger.warning
        log("nothing sent for {:g} s: {}", breakers.cooldown.total_seconds(), listed.reason)
    t.store.messages.note_waiting(now, breakers.open(now)[SERVER])
    return None


def _quiet(t: Context, counts: TickCounts) -> bool:
    """Inside the quiet hours: hold every due message until they end."""
    until = t.pacing.quiet_until(t.clock())
    if until is None:
        return False
    reason = (
        f"Waiting for the end of the quiet hours ({t.pacing.describe_quiet()}) at "
        f"{until.astimezone(t.pacing.zone):%Y-%m-%d %H:%M}."
    )
    counts.held += t.store.messages.hold(t.clock(), None, until, reason)
    return True
