"""One tick: settle what is late or abandoned, claim what is due, send it, roll campaigns up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from poller import lanes, schedules
from poller.breaker import Breakers
from poller.context import Context
from poller.contract import session_name
from poller.counts import TickCounts
from poller.pacing import Pacing
from poller.plan import quiet_reason
from poller.send import send_all
from poller.servers import Routes, Servers, route, server_key
from poller.store import Doc, Store
from poller.store.messages import campaign_ids
from poller.store.sweep import Settled
from poller.waha import WahaClient

__all__ = ["TickCounts", "tick"]

# After the sends, a tick settles at most this many more chunks of a backlog of late messages;
# the rest waits for the next tick, which comes at once.
SETTLE_CHUNKS_AFTER_SENDING = 5
# A claim reads this many more of a lane's due messages than it takes, to pass over those that
# wait to be retried.
SKIPPED = 5


def tick(
    store: Store,
    waha: WahaClient | Servers,
    batch_size: int,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    breakers: Breakers | None = None,
    pacing: Pacing | None = None,
    clock: Callable[[], datetime] | None = None,
) -> TickCounts:
    """Run one tick and return its counts.

    `waha`: the WAHA servers, or the client of the only one.
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
        waha if isinstance(waha, Servers) else Servers.one(waha),
        clock,
        stop or threading.Event(),
        breakers or Breakers(store.timings.retry),
        pacing or Pacing(),
    )
    started = clock()
    counts = TickCounts()
    campaigns: set[Any] = set()
    try:
        occurrences = schedules.materialise(
            store, clock(), store.timings.tick_interval, t.pacing.zone
        )
        counts.occurred, counts.missed = occurrences.created, occurrences.missed
        t.caps.update(store.sessions.daily_caps())
        t = replace(t, routes=_route(t, counts))
        paused = lanes.campaign_holds(t, clock())
        lanes.adopt(t, clock(), paused, counts)
        lane_docs = store.turns.lanes()
        ready = lanes.mark_blocked(t, lane_docs)
        behind = lanes.oldest(t, started, lane_docs)
        cutoff = started - store.timings.lookback
        stale = [lane for lane, doc in behind.items() if doc["plannedAt"] < cutoff]
        # One chunk of what is late first: a backlog of thousands never holds up the sends.
        swept = store.sweeper.sweep(started, started, lanes=stale)
        counts.add_settled(swept)
        campaigns |= campaign_ids(swept.campaigns)
        counts.replanned += lanes.correct(t, clock(), lane_docs, ready, behind)
        last_claim, cancelling, asked = started, False, list(ready)
        while not t.stop.is_set() and not _all_down(t):
            if _quiet(t, counts, lane_docs):
                break
            cancelled = store.campaigns.cancel(clock())  # before each claim, not once a tick
            counts.add_settled(cancelled)
            campaigns |= campaign_ids(cancelled.campaigns)
            cancelling = cancelled.more
            last_claim = clock()
            batch = _claim(t, last_claim, started, batch_size, asked, paused)
            if not batch:
                break
            counts.claimed += len(batch)
            campaigns |= campaign_ids(d.get("campaignId") for d in batch)
            released = counts.released
            send_all(t, batch, store.sessions.names(batch), counts)
            if counts.released - released == len(batch):
                break  # every session's turn is taken by another poller: nothing to do now
        swept = _settle_backlog(t, started, swept, counts, campaigns)
        more = swept.more or cancelling
        counts.next_at = _next_at(t, started, last_claim, more, lane_docs, occurrences.next_at)
    finally:
        # Even after a failure: what was settled before it must show in its campaign. Open
        # campaigns no tick touched are recounted now and then (the web app deletes messages).
        campaigns |= set(store.campaigns.to_recount(clock()))
        store.campaigns.rollup(campaigns, clock())
    return counts


def _claim(
    t: Context,
    now: datetime,
    since: datetime,
    limit: int,
    ready: list[str],
    paused: set[str],
) -> list[Doc]:
    """Claim up to `limit` messages: claims whose poller went away first (of sessions that can
    send), then each ready lane's due messages in priority order, one a lane when sends are
    paced (its turn). A lane whose breaker opened during the tick waits. A lane found with
    nothing more due is taken out of `ready`: the tick's later rounds do not ask it again."""
    lapsed = t.store.messages.lapsed(now, since, limit)
    names = t.store.sessions.names(lapsed)
    can_send = [d["_id"] for d in lapsed if lanes.why_not(t, session_name(d, names) or "") is None]
    batch = t.store.messages.take_over(can_send, now, since)
    busy = set(t.store.turns.waiting(now)) if t.pacing.paced else set()
    broken = t.breakers.open(now)
    for lane in list(ready):
        room = limit - len(batch)
        if room <= 0:
            break
        if lane in busy or lanes.breaker_open(t, lane, broken) is not None:
            continue
        if t.pacing.paced:
            room = 1
        due = t.store.plans.due(lane, now, room + SKIPPED)
        ids = lanes.choose(t, due, now, room, paused)
        batch += t.store.messages.take(ids, now)
        if len(due) < room + SKIPPED and len(ids) < room:
            ready.remove(lane)  # all it had due is in hand
    return batch


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


def _next_at(
    t: Context,
    started: datetime,
    last_claim: datetime,
    more: bool,
    lane_docs: dict[str, Doc],
    occurrence: datetime | None,
) -> datetime | None:
    """When to tick again: at once while messages are left to settle (`more`); else when the
    next message comes due after the last claim read (now, if one came due since): a new one,
    or one planned in a lane; when a paced session's turn comes that was taken after this
    tick started (now, if it passed already); or when a recurring schedule's next occurrence
    is to be materialised (`occurrence`)."""
    if t.stop.is_set():
        return None
    now = t.clock()
    until = now + t.store.timings.tick_interval
    later = [t.store.plans.next_new(last_claim, until), occurrence]
    later += [t.store.plans.planned_between(lane, last_claim, until) for lane in lane_docs]
    if more:
        later.append(now)
    if t.pacing.paced:
        later.extend(t.store.turns.waiting(started).values())
    return min((at for at in later if at is not None), default=None)


def _route(t: Context, counts: TickCounts) -> Routes:
    """Ask the WAHA servers which sessions they hold (see `servers.route`), for the tick's
    counts and the heartbeat. A tick every server refused the key counts as `key_rejected`."""
    routes = route(t.servers, t.breakers, t.clock())
    counts.servers = [dict(state) for state in t.servers.states.values()]
    counts.key_rejected = all(s["keyAccepted"] is False for s in counts.servers)
    return routes


def _all_down(t: Context) -> bool:
    """Every WAHA server's breaker is open: nothing can be sent in this tick."""
    broken = t.breakers.open(t.clock())
    return all(server_key(name) in broken for name in t.servers.clients)


def _quiet(t: Context, counts: TickCounts, lane_docs: dict[str, Doc]) -> bool:
    """Inside the quiet hours: plan every lane's messages due before their end from then on."""
    now = t.clock()
    until = t.pacing.quiet_until(now)
    if until is None:
        return False
    reason = quiet_reason(t.pacing, until)
    for lane in lane_docs:
        if t.store.plans.behind(lane, until, now) is not None:
            counts.held += lanes.replan(t, lane, until, reason)
    return True
