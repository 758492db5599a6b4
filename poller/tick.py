"""One tick: the campaigns' flags, the new messages planned, the due ones claimed across every
session and sent, what is past its deadline settled, and the campaigns' counts rolled up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from poller import lanes, rollup, schedules, settle
from poller.breaker import Breakers
from poller.context import Caps, Context, Memory
from poller.contract import CLAIMED, done, session_name
from poller.counts import TickCounts
from poller.gate import Gate
from poller.pacing import Pacing
from poller.plan import quiet_reason
from poller.send import send_all
from poller.servers import Routes, Servers, route, server_key
from poller.store import Doc, Store
from poller.store.messages import deadline
from poller.store.plans import ADOPT_CHUNK
from poller.waha import WahaClient

__all__ = ["TickCounts", "tick"]

# After the sends, a tick settles at most this many more chunks of a backlog of late messages;
# the rest waits for the next tick, which comes at once.
SETTLE_CHUNKS_AFTER_SENDING = 5
# A claim round reads the queue at most this many times (passing over the lanes that cannot
# send, settling a chunk past its deadline each time): the rest is for the next round.
READS_PER_ROUND = 6
# A claim round reads this many more planned messages than it may claim: those of lanes that
# cannot send, retries not yet due and claims in flight are passed over in memory.
SPARE = 10


def tick(
    store: Store,
    waha: WahaClient | Servers,
    batch_size: int,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    breakers: Breakers | None = None,
    pacing: Pacing | None = None,
    clock: Callable[[], datetime] | None = None,
    memory: Memory | None = None,
) -> TickCounts:
    """Run one tick and return its counts.

    `waha`: the WAHA servers, or the client of the only one.
    `now` fixes the clock (tests, replays), and `clock` replaces it (a fake clock that moves);
    without either, every step reads the wall clock.
    `stop` is checked between messages: once set, the message in flight finishes and the
    claims not yet started are released. `breakers` carry WAHA's failures from one tick to the
    next, and `memory` what else a process keeps (a daemon keeps both); without them, this
    tick starts afresh. `pacing` spaces each session's messages and sets the cap, quiet hours
    and typing; without it, messages go out as fast as WAHA takes them.
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
        Caps(store),
        memory=memory or Memory(),
    )
    started = clock()
    counts = TickCounts()
    flags = None
    # Once a POLL_INTERVAL_SECONDS: the recurring schedules, and the open campaigns' checks.
    last = t.memory.checked_at
    regular = last is None or started - last >= store.timings.tick_interval
    failed = True
    try:
        occurs = t.memory.occurs_at
        if regular or (occurs is not None and occurs <= started):
            # What occurs up to an interval ahead, and when the next occurrence comes in reach.
            occurrences = schedules.materialise(
                store, clock(), store.timings.tick_interval, t.pacing.zone
            )
            counts.occurred, counts.missed = occurrences.created, occurrences.missed
            t.memory.occurs_at = occurrences.next_at
        t = replace(t, routes=_route(t, counts))
        flags = store.campaigns.flags()
        t = replace(t, held=tuple(c for c in flags.held if c not in flags.resumed))
        _campaign_events(t, flags, counts)
        if not t.memory.upgraded:
            _upgrade(t, counts)
        coming, backlog = _plan_new(t, counts)
        later = [t.memory.occurs_at, coming]
        first, waited = True, False
        while not t.stop.is_set() and (first or not _all_down(t)):
            if _quiet(t, counts, later):
                break
            # Claims whose poller went away: at a regular tick (their lease is longer).
            claimed = _claim(t, clock(), started, batch_size, counts, first and regular)
            later.append(claimed.next_at)
            first, waited = False, waited or claimed.waited
            if claimed.gate is None:  # nothing claimed
                break
            counts.claimed += len(claimed.batch)
            released = counts.released
            send_all(t, claimed.batch, claimed.names, claimed.gate, counts)
            if counts.released - released == len(claimed.batch):
                break  # every session's turn is taken by another poller: nothing to do now
        if backlog:
            later.append(_settle_backlog(t, counts))
        counts.next_at = _next_at(t, started, later, waited or counts.claimed > 0)
        failed = False
    finally:
        # Even after a failure: what ended before it must show in its campaign.
        rollup.rollup(t, flags, counts, clock(), regular)
        if failed:  # the next tick is a regular one: it takes over what this one left
            t.memory.checked_at = None
    return counts


def _campaign_events(t: Context, flags: Any, counts: TickCounts) -> None:
    """What the web app did to its campaigns since the last tick: a pause is noted (its
    messages wait where they are), a resume plans what it held again from now, and a
    cancellation ends what waits (a chunk a tick)."""
    now = t.clock()
    for campaign in flags.newly_paused:
        t.store.campaigns.mark_held(campaign, now)
    for campaign in flags.resumed:
        if campaign in flags.cancelled:
            t.store.campaigns.unhold(campaign)
        else:
            lanes.resume(t, campaign, now, counts)
    for campaign in flags.cancelled:
        docs = t.store.plans.campaign_waiting(campaign, settle.CHUNK)
        t.store.messages.retire([d for d in docs if done(d)], counts.stats)
        settle.cancel(t.store, [d for d in docs if not done(d)], now, counts)
        counts.stats.recount([campaign])  # completes it once nothing is in flight
        # The messages of other campaigns planned after these go sooner.
        counts.replanned += lanes.fill_holes(t, now, {d.get("lane") or "" for d in docs})


def _plan_new(t: Context, counts: TickCounts) -> tuple[datetime | None, bool]:
    """Read the messages not yet planned that are due before the next tick, a chunk at a
    time: plan the due ones, fail the undated ones, expire the late ones (one chunk of a
    backlog: the rest after the sends). When the first of the others comes due, and whether
    a backlog of late ones is left."""
    store, now = t.store, t.clock()
    until = now + store.timings.tick_interval
    cutoff = now - store.timings.lookback
    since, backlog = None, False
    while not t.stop.is_set():
        docs = store.plans.unplanned(until, since=since)
        store.messages.retire([d for d in docs if done(d)], counts.stats)
        dated = [d for d in docs if isinstance(d.get("scheduledAt"), datetime) and not done(d)]
        if since is None:
            undated = [d for d in docs if d not in dated and not done(d)]
            settle.undated(store, undated, now, counts)
            late = [d for d in dated if d["scheduledAt"] < cutoff]
            settle.too_late_new(store, late[: settle.CHUNK], now, counts)
            backlog = len(late) > settle.CHUNK
        lanes.plan(t, [d for d in dated if cutoff <= d["scheduledAt"] <= now], now, counts)
        coming = [d["scheduledAt"] for d in dated if d["scheduledAt"] > now]
        if len(docs) < ADOPT_CHUNK or coming:
            return min(coming, default=None), backlog
        if since is None and dated and dated[-1]["scheduledAt"] < cutoff:
            since = cutoff  # a backlog of late ones fills the read: the due ones are past it
    return None, backlog


def _settle_backlog(t: Context, counts: TickCounts) -> datetime | None:
    """After the sends, a few more chunks of late messages never planned; now, when some are
    still left for the next tick."""
    store, now = t.store, t.clock()
    cutoff = now - store.timings.lookback
    for _ in range(SETTLE_CHUNKS_AFTER_SENDING):
        if t.stop.is_set():
            return None
        docs = store.plans.unplanned(cutoff, settle.CHUNK)
        late = [d for d in docs if isinstance(d.get("scheduledAt"), datetime) and not done(d)]
        settle.too_late_new(store, [d for d in late if d["scheduledAt"] < cutoff], now, counts)
        if len(docs) < settle.CHUNK:
            return None
    return now


@dataclass
class _Claimed:
    """A claim round: the messages claimed, with what sending them needs, and when the next
    planned message of the queue comes due."""

    batch: list[Doc] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    gate: Gate | None = None
    next_at: datetime | None = None
    waited: bool = False  # a due message waits for a paced session's turn


def _claim(
    t: Context, now: datetime, since: datetime, limit: int, counts: TickCounts, lapsed: bool
) -> _Claimed:
    """One read of the queue across every lane: settle what is past its deadline, then claim up
    to `limit` due messages, each lane's in priority order, one a lane when sends are paced
    (its turn). With `lapsed`, also take over claims whose poller went away."""
    store, cutoff = t.store, now - t.store.timings.lookback
    until = now + store.timings.tick_interval
    skip: set[str] = set()
    for _ in range(READS_PER_ROUND):  # again past what filled the read but cannot be claimed
        docs = store.plans.planned(until, t.held, skip, 4 * limit + SPARE)
        waiting = [d for d in docs if d.get("isPicked") is not True]
        store.messages.retire([d for d in waiting if done(d)], counts.stats)
        waiting = [d for d in waiting if not done(d)]
        later = [d for d in waiting if _rescheduled(d, now)]
        store.messages.forget([d["_id"] for d in later])
        waiting = [d for d in waiting if d not in later]
        behind = [d for d in waiting if d["plannedAt"] < cutoff]
        settle.behind(store, behind, now, counts)
        due = lanes.lanes_of(d for d in waiting if cutoff <= d["plannedAt"] <= now)
        busy = _busy(t, now, due)
        blocked = lanes.note_blocked(t, lanes.lanes_of(waiting)) | busy
        full = len(docs) == 4 * limit + SPARE
        if not (full and (behind or blocked - skip)):
            break
        skip |= blocked
    counts.replanned += lanes.correct(t, now, {k: v for k, v in due.items() if k not in blocked})
    chosen = _choose(t, due, blocked, now, limit)
    gone = store.plans.lapsed(now, since, limit) if lapsed else []
    batch = _take_over(t, gone, now, since, counts) + store.messages.claim(chosen, now)
    coming = [d["plannedAt"] for d in waiting if d["plannedAt"] > now]
    coming += [d["retryAt"] for ds in due.values() for d in ds if lanes.retry_at(d, now)]
    if full:
        coming.append(now)  # more in the queue than this read held
    names = store.sessions.names(batch)
    gate = Gate.read(store, batch, names) if batch else None
    return _Claimed(batch, names, gate, min(coming, default=None), bool(busy))


def _choose(
    t: Context, due: dict[str, list[Doc]], blocked: set[str], now: datetime, limit: int
) -> list[Any]:
    """Of each lane's due messages, the ids to claim: highest priority first, then in planned
    order; one a lane when paced; `limit` in all, the lanes taken in turn."""
    per_lane = []
    for lane, docs in due.items():
        if lane in blocked:
            continue
        ready = sorted(
            (d for d in docs if lanes.retry_at(d, now) is None),
            key=lambda d: (-_rank(d), d["plannedAt"]),
        )
        per_lane.append(ready[:1] if t.pacing.paced else ready)
    chosen: list[Any] = []
    while len(chosen) < limit and any(per_lane):
        for docs in per_lane:
            if docs and len(chosen) < limit:
                chosen.append(docs.pop(0)["_id"])
    return chosen


def _take_over(
    t: Context, lapsed: list[Doc], now: datetime, since: datetime, counts: TickCounts
) -> list[Doc]:
    """Claims whose poller went away: taken over while before their deadline and their
    session can send; put back to wait where their campaign is paused or their session cannot
    send; settled once past their deadline (or, sent without a message id, unknown)."""
    store, cutoff = t.store, now - t.store.timings.lookback
    names = store.sessions.names(lapsed)
    timely, back, late = [], [], []
    for doc in lapsed:
        begins = deadline(doc)
        in_time = begins is not None and begins >= cutoff
        resend = doc.get("status") == CLAIMED or isinstance(doc.get("sendId"), str)
        lane = session_name(doc, names) or ""
        if not (in_time and resend):
            late.append(doc)
        elif t.paused(doc) or lanes.why_not(t, lane) is not None:
            back.append(doc)
        else:
            timely.append(doc)
    settle.abandoned(store, late, now, since, counts)
    store.messages.give_back([d["_id"] for d in back if d.get("status") == CLAIMED], now, since)
    return store.messages.take_over([d["_id"] for d in timely], now, since)


def _busy(t: Context, now: datetime, due: dict[str, list[Doc]]) -> set[str]:
    """The paced lanes whose turn another send holds (this poller's or another's)."""
    if not (t.pacing.paced and due):
        return set()
    return set(t.store.turns.waiting(now)) & set(due)


def _next_at(
    t: Context, started: datetime, later: list[datetime | None], turns: bool
) -> datetime | None:
    """When to tick again: the first of when a message not yet planned comes due, when the
    next planned one (or a retry) does, as this tick's last reads found them; when a paced
    session's turn taken during this tick ends; when a recurring schedule's next occurrence
    is to be materialised. In the past (at once) when one of them came while the tick ran."""
    if t.stop.is_set():
        return None
    if t.pacing.paced and turns:
        later.extend(t.store.turns.waiting(started).values())
    return min((at for at in later if at is not None), default=None)


def _quiet(t: Context, counts: TickCounts, later: list[datetime | None]) -> bool:
    """Inside the quiet hours: plan every lane's messages due before their end from then on."""
    now = t.clock()
    until = t.pacing.quiet_until(now)
    if until is None:
        return False
    later.append(until)
    reason = quiet_reason(t.pacing, until)
    docs = t.store.plans.planned(until, t.held, (), 1000)
    early = [d for d in docs if d.get("isPicked") is not True and d["plannedAt"] < until]
    for lane, waiting in lanes.lanes_of(early).items():
        if lanes.paced(t, lane):
            counts.held += lanes.replan(t, lane, until, reason)
        else:
            counts.held += t.store.messages.replan([(d["_id"], until) for d in waiting], reason)
    return True


def _upgrade(t: Context, counts: TickCounts) -> None:
    """What an earlier version left, planned once per process: messages in a lane without a
    plan (a paused campaign's, or a claim it gave back), and the holds of versions before
    plans (`heldUntil`: due from then)."""
    store, now = t.store, t.clock()
    stranded = [d for d in store.plans.unplanned_in_lanes(10_000) if not done(d)]
    times = [(d["_id"], now) for d in stranded if not t.paused(d)]
    counts.replanned += store.messages.replan(times, None)
    holds = [d for d in store.plans.held_until(10_000) if not done(d)]
    for doc in holds:  # planned as due from the later of scheduledAt and heldUntil
        if isinstance(doc.get("heldUntil"), datetime):
            doc["scheduledAt"] = max(doc["heldUntil"], _scheduled(doc))
    lanes.plan(t, [d for d in holds if isinstance(d.get("scheduledAt"), datetime)], now, counts)
    t.memory.upgraded = True


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


def _rescheduled(doc: Doc, now: datetime) -> bool:
    """The web app moved the message to later since it was planned: planned again once due."""
    scheduled = doc.get("scheduledAt")
    return isinstance(scheduled, datetime) and scheduled > now


def _rank(doc: Doc) -> float:
    rank = lanes.priority(doc)
    return rank if isinstance(rank, int | float) else 0


def _scheduled(doc: Doc) -> datetime:
    scheduled = doc.get("scheduledAt")
    return scheduled if isinstance(scheduled, datetime) else datetime.min.replace(tzinfo=UTC)
