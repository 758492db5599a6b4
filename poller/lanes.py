"""Keeping each WhatsApp session's plan: new messages planned into their lanes, plans corrected
when reality drifts from them, and which lanes cannot send now and why.

Every step here writes only on an event (new messages, a lane that fell behind or has a hole, a
session that stops or starts sending, a campaign paused or resumed, the daily cap, the quiet
hours), once per message it moves: never once a tick, nor for time that passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from poller.context import Context, daily_cap
from poller.contract import FAILED, YES, session_name, show
from poller.counts import TickCounts
from poller.plan import Slots, allowed
from poller.servers import server_key
from poller.store import Doc
from poller.store.plans import ADOPT_CHUNK, due_time

# Sent before the rest of its lane, at the lane's next turn: a priority above this.
URGENT = 0
PAUSED_REASON = "Waiting: its campaign is paused."


@dataclass(frozen=True)
class Adoption:
    """A new message's place: its lane, priority and planned time (None: held, its campaign
    is paused), and why it waits longer than its turn, if it does."""

    id: Any
    lane: str
    priority: float
    at: datetime | None
    why: str | None


def priority(doc: Doc) -> float | str:
    """A message's `priority` as a number (0 when missing), or why it is not one."""
    value = doc.get("priority", 0)
    if value is None:
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return value
    return f"priority {show(value)} is not a number: write a number (higher goes first) or none."


def adopt(t: Context, now: datetime, paused: set[str], counts: TickCounts) -> None:
    """Plan the messages that came due since the last tick, a chunk at a time (`counts`: how
    many were planned, and held later than their turn by the quiet hours or the cap)."""
    while not t.stop.is_set():
        docs = t.store.plans.new(now)
        rows = _adopt(t, now, paused, docs, t.store.turns.lanes(), counts)
        adopted = set(t.store.plans.adopt(rows)) if rows else set()
        counts.planned += len(adopted)
        counts.held += sum(1 for r in rows if r.id in adopted and r.at and r.why)
        if len(docs) < ADOPT_CHUNK or not adopted:
            break


def _adopt(
    t: Context,
    now: datetime,
    paused: set[str],
    docs: list[Doc],
    lanes: dict[str, Doc],
    counts: TickCounts,
) -> list[Adoption]:
    """Where each new message goes (the lanes' next free slots are saved)."""
    if not docs:
        return []
    names = t.store.sessions.names(docs)
    rows: list[Adoption] = []
    slots: dict[str, Slots] = {}
    for doc in docs:
        rank = priority(doc)
        if isinstance(rank, str):
            t.store.plans.reject(doc["_id"], FAILED, rank, now)
            counts.failed += 1
            logger.warning("message {} failed: {}", doc["_id"], rank)
            continue
        lane = session_name(doc, names) or ""  # "" : sending fails it with the reason
        if str(doc.get("campaignId")) in paused:
            rows.append(Adoption(doc["_id"], lane, rank, None, PAUSED_REASON))
        else:
            at, why = _slot(t, now, lane, doc, rank, slots, lanes)
            rows.append(Adoption(doc["_id"], lane, rank, at, why))
    for lane, lane_slots in slots.items():
        t.store.turns.save_slots(lane, lane_slots)
    t.store.turns.ensure({row.lane for row in rows} - set(lanes) - set(slots))
    return rows


def _slot(
    t: Context,
    now: datetime,
    lane: str,
    doc: Doc,
    rank: float,
    slots: dict[str, Slots],
    lanes: dict[str, Doc],
    resumed: bool = False,
) -> tuple[datetime, str | None]:
    """The planned time of a message: the lane's next free slot when its sends are paced or
    capped; else when it is due (now, for a campaign that `resumed`), after the quiet hours.
    An urgent message (a priority above 0) takes no slot: it goes at the lane's next turn.
    With what moved it later, if anything."""
    cap = _cap(t, lane)
    if rank > URGENT:
        return allowed(t.pacing, max(due_time(doc), now), None)
    if not (t.pacing.paced or cap is not None):
        return allowed(t.pacing, now if resumed else due_time(doc), None)
    if lane not in slots:
        slots[lane] = t.store.turns.slots(lanes.get(lane), now, _day(t, now))
    at = slots[lane].take(t.pacing, cap, _text(doc), lane)
    return at, slots[lane].why


def replan(t: Context, lane: str, start: datetime, reason: str | None = None) -> int:
    """Plan every waiting message of a lane again from `start` (an event moved its plan):
    urgent ones at `start`, the others one slot each. `reason` goes into their lastError."""
    docs = t.store.plans.waiting(lane)
    cap = _cap(t, lane)
    slots = t.store.turns.slots(t.store.turns.lane(lane), start, _day(t, start), fresh=True)
    times = []
    for doc in docs:
        rank = priority(doc)
        if isinstance(rank, int | float) and rank > URGENT:
            times.append((doc["_id"], allowed(t.pacing, start, None)[0]))
        else:
            times.append((doc["_id"], slots.take(t.pacing, cap, _text(doc), lane)))
    moved = t.store.plans.move(times, reason)
    t.store.turns.save_slots(lane, slots)
    if moved:
        logger.info("lane '{}': {} waiting message(s) planned again from {}", lane, moved, start)
    return moved


def drift(t: Context) -> timedelta:
    """How far a lane may fall behind its plan before it is planned again."""
    return t.store.timings.lookback / 4


def oldest(t: Context, now: datetime, lane_docs: dict[str, Doc]) -> dict[str, Doc]:
    """Each lane's earliest waiting message planned more than `drift` ago, where it has one."""
    found = {lane: t.store.plans.oldest(lane, now - drift(t)) for lane in lane_docs}
    return {lane: doc for lane, doc in found.items() if doc is not None}


def correct(
    t: Context,
    now: datetime,
    lane_docs: dict[str, Doc],
    ready: Iterable[str],
    behind: dict[str, Doc],
) -> int:
    """Plan again the lanes that can send and drifted from their plan: fell behind it (an
    outage, a slow WAHA, a poller that was away; `behind`: each lane's oldest message planned
    more than `drift` ago) or have a hole in it (messages deleted or cancelled); how many
    messages moved. A message waiting to retry does not make its lane late."""
    longest = timedelta(seconds=t.pacing.gap_max + (t.pacing.typing_max if t.pacing.typing else 0))
    moved = 0
    for lane in ready:
        head = behind.get(lane)
        if head is not None:
            retrying = isinstance(head.get("retryAt"), datetime) and head["retryAt"] > now
            if not retrying or t.store.plans.behind(lane, now - drift(t), now) is not None:
                moved += replan(t, lane, now)
                continue
        tail = (lane_docs.get(lane) or {}).get("tail")
        horizon = now + longest + drift(t)
        if not isinstance(tail, datetime) or tail <= horizon:
            continue
        if t.store.plans.planned_between(lane, now - drift(t), horizon) is not None:
            continue
        # Nothing planned soon though the plan goes on: a hole, unless the cap or the quiet
        # hours make it.
        today = t.store.turns.slots(lane_docs.get(lane), now, _day(t, now), fresh=True)
        if allowed(t.pacing, now, _cap(t, lane), today, lane)[0] < horizon:
            moved += replan(t, lane, now)
    return moved


def _cap(t: Context, lane: str) -> int | None:
    cap = daily_cap(t, lane) if lane else None
    return cap if isinstance(cap, int) else None


def _day(t: Context, now: datetime) -> str:
    return t.pacing.day(now).isoformat()


def _text(doc: Doc) -> str:
    content = doc.get("content")
    return content if isinstance(content, str) else ""


def choose(t: Context, docs: list[Doc], now: datetime, room: int, paused: set[str]) -> list[Any]:
    """Of a lane's due messages in claim order, the ids to claim (at most `room`). Those the
    web app deleted, marked sent or rescheduled to later since they were planned leave the
    plan instead."""
    chosen: list[Any] = []
    done: list[Any] = []
    later: list[Any] = []
    for doc in docs:
        if any(doc.get(flag) in YES for flag in ("isSent", "isDeleted")):
            done.append(doc["_id"])
        elif isinstance(doc.get("scheduledAt"), datetime) and doc["scheduledAt"] > now:
            later.append(doc["_id"])
        elif str(doc.get("campaignId")) not in paused and len(chosen) < room:
            chosen.append(doc["_id"])
    t.store.plans.retire(done)
    t.store.plans.forget(later)
    return chosen


def breaker_open(t: Context, lane: str, open_now: dict[str, str]) -> str | None:
    """Why a breaker holds this lane's sends: its WAHA server's, else its own; None when
    neither is open. `open_now`: `t.breakers.open(...)`, the breakers open and why."""
    server = t.routes.server_of(lane)
    if server is not None and server_key(server) in open_now:
        return open_now[server_key(server)]
    return open_now.get(lane)


def why_not(t: Context, lane: str) -> str | None:
    """Why a lane cannot send now, or None when it can (or it names no session: sending its
    messages fails them with a reason)."""
    if not lane:
        return None
    held = breaker_open(t, lane, t.breakers.open(t.clock()))  # one may open during a tick
    if held is not None:
        return held
    cap = daily_cap(t, lane)
    if isinstance(cap, str):
        return cap
    return t.routes.why_not(lane)


def mark_blocked(t: Context, lane_docs: dict[str, Doc]) -> list[str]:
    """Note which lanes cannot send and why, in the lane and in its messages' lastError, once
    per reason; the lanes that can send. A lane that cannot send is not planned again: its
    messages expire once more than the lookback window past their planned time, as any
    message does that WAHA or its session could not take in time."""
    ready = []
    for lane, doc in lane_docs.items():
        reason = why_not(t, lane)
        was = doc.get("blocked")
        if reason is None:
            ready.append(lane)
        if reason != was:
            t.store.turns.block(lane, reason)
            if reason is None:
                logger.info("session '{}' can send again", lane)
            else:
                t.store.plans.note(lane, reason)
                logger.info("session '{}' waits: {}", lane, reason)
    return ready


def campaign_holds(t: Context, now: datetime) -> set[str]:
    """Take the messages of newly paused campaigns out of the plan, and plan those of resumed
    ones at the end of their lanes. The paused campaigns, by id as text."""
    campaigns, plans = t.store.campaigns, t.store.plans
    for campaign in campaigns.to_hold():
        held = plans.hold_campaign(campaign, PAUSED_REASON)
        campaigns.mark_held(campaign, now)
        logger.info("campaign {} paused: {} message(s) wait", campaign, held)
    resumed = campaigns.to_resume()
    if resumed:
        lane_docs = t.store.turns.lanes()
        for campaign in resumed:
            docs = plans.held(campaign)
            names = t.store.sessions.names(docs)
            slots: dict[str, Slots] = {}
            times = []
            for doc in docs:
                lane = doc.get("lane") or session_name(doc, names) or ""
                rank = priority(doc)
                rank = rank if not isinstance(rank, str) else 0
                at, _ = _slot(t, now, lane, doc, rank, slots, lane_docs, resumed=True)
                times.append((doc["_id"], at))
            plans.resume(times)
            for lane, lane_slots in slots.items():
                t.store.turns.save_slots(lane, lane_slots)
            campaigns.mark_held(campaign, None)
            logger.info("campaign {} resumed: {} message(s) planned", campaign, len(times))
    return {str(c) for c in campaigns.paused()}
