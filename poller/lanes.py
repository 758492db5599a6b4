"""Each WhatsApp session's plan (its lane): new messages planned into it, plans corrected when an
event moves them (a lane that fell behind or has a hole, a campaign resumed, the daily cap, the
quiet hours), and which lanes cannot send now and why.

Without pacing or a cap a message is planned at its scheduledAt (after the quiet hours) and
never moved, so that its deadline stays the lookback window past its scheduledAt. With them, it
takes its lane's next free slot, and the lane is planned again only on an event. Every write
here is one per message moved, and only on an event: never once a tick, nor for time passing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from poller.context import Context, daily_cap
from poller.contract import FAILED, addressee, done, show
from poller.counts import TickCounts
from poller.pacing import Pacing
from poller.plan import Slots, allowed
from poller.servers import server_key
from poller.store import Doc
from poller.store.messages import UNPICKED

# Sent before the rest of its lane, at the lane's next turn: a priority above this.
URGENT = 0


def priority(doc: Doc) -> float | str:
    """A message's `priority` as a number (0 when missing), or why it is not one."""
    value = doc.get("priority", 0)
    if value is None:
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return value
    return f"priority {show(value)} is not a number: write a number (higher goes first) or none."


def paced(t: Context, lane: str) -> bool:
    """Whether the lane's messages take slots (pacing, or a daily cap), or go when due."""
    return paces(t.pacing, _cap(t, lane))


def paces(pacing: Pacing, cap: int | None) -> bool:
    """Whether a session with this daily cap (None: none) plans its messages into slots."""
    return pacing.paced or cap is not None


def plan(
    t: Context, docs: list[Doc], now: datetime, counts: TickCounts, resumed: bool = False
) -> None:
    """Plan messages not yet planned (due, or of a `resumed` campaign: from now) into their
    lanes, one write each. A message that cannot be sent as written (its priority, its chatId
    or its session: `contract.addressee`) fails when first seen, taking no slot; what it
    sends is checked at its send (its media is not read before). A message of a
    paused campaign is parked at its due time, taking no slot: it waits there, never claimed
    nor expired, until its campaign resumes and plans it again."""
    if not docs:
        return
    names = t.store.sessions.names(docs)
    lane_docs = t.store.turns.lanes()
    slots: dict[str, Slots] = {}
    rows: list[tuple[Any, Doc]] = []
    held = 0
    where = t.store.sessions.collection.name
    for doc in docs:
        rank = priority(doc)
        to = rank if isinstance(rank, str) else addressee(doc, names, where)
        if isinstance(rank, str) or isinstance(to, str):  # failed at once, no slot taken
            unplanned = {"lane": None, **UNPICKED}
            counts.failed += t.store.messages.end(
                [doc], unplanned, (FAILED, str(to)), now, counts.stats
            )
            logger.warning("message {} failed: {}", doc["_id"], to)
            continue
        lane = to[0]
        if t.paused(doc):  # parked at its due time: no slot taken
            at, why = allowed(t.pacing, _due(doc, now), None)
        else:
            at, why = _slot(t, now, lane, doc, rank, slots, lane_docs, resumed)
        fields: Doc = {"lane": lane, "priority": rank, "plannedAt": at}
        if why is not None:
            fields["lastError"] = why
            held += 1
        rows.append((doc["_id"], fields))
    for lane, lane_slots in slots.items():
        t.store.turns.save_slots(lane, lane_slots)
    t.store.turns.ensure({fields["lane"] for _, fields in rows} - set(lane_docs) - set(slots))
    counts.planned += t.store.messages.plan(rows)
    counts.stats.saw(d.get("campaignId") for d in docs)
    counts.held += held


def _slot(
    t: Context,
    now: datetime,
    lane: str,
    doc: Doc,
    rank: float,
    slots: dict[str, Slots],
    lane_docs: dict[str, Doc],
    resumed: bool,
) -> tuple[datetime, str | None]:
    """The planned time of a message: the lane's next free slot when its sends are paced or
    capped; else when it is due (now, for a campaign that `resumed`), after the quiet hours.
    An urgent message (a priority above 0) takes no slot: it goes at the lane's next turn.
    With what moved it later, if anything."""
    due = _due(doc, now) if not resumed else now
    if lane not in slots and rank <= URGENT and paced(t, lane):
        slots[lane] = t.store.turns.slots(lane_docs.get(lane), now, _day(t, now))
    return slot(t.pacing, _cap(t, lane), slots.get(lane), lane, due, now, rank, _text(doc))


def slot(
    pacing: Pacing,
    cap: int | None,
    slots: Slots | None,
    lane: str,
    due: datetime,
    now: datetime,
    rank: float,
    text: str,
) -> tuple[datetime, str | None]:
    """The planned time of a message due at `due`, first seen `now`, with priority `rank`:
    the lane's next free slot from `slots` when its sends are paced or capped (None: they are
    not), else when it is due, after the quiet hours. An urgent message (a priority above 0)
    takes no slot. With what moved it later, if anything. The one rule of a plan: the tick
    and a campaign's dry run (poller/campaign_import.py) both use it."""
    if rank > URGENT:
        return allowed(pacing, max(due, now), None)
    if slots is None:
        return allowed(pacing, due, None)
    return slots.take(pacing, cap, text, lane), slots.why


def replan(t: Context, lane: str, start: datetime, reason: str | None = None) -> int:
    """Plan every waiting message of a lane again from `start` (an event moved its plan):
    urgent ones at `start`, the others one slot each. `reason` goes into their lastError."""
    docs = t.store.plans.waiting(lane, t.held)
    cap = _cap(t, lane)
    slots = t.store.turns.slots(t.store.turns.lane(lane), start, _day(t, start), fresh=True)
    times = []
    for doc in docs:
        rank = priority(doc)
        if isinstance(rank, int | float) and rank > URGENT:
            times.append((doc["_id"], allowed(t.pacing, start, None)[0]))
        else:
            times.append((doc["_id"], slots.take(t.pacing, cap, _text(doc), lane)))
    moved = t.store.messages.replan(times, reason)
    t.store.turns.save_slots(lane, slots)
    if moved:
        logger.info("lane '{}': {} waiting message(s) planned again from {}", lane, moved, start)
    return moved


def resume(t: Context, campaign: Any, now: datetime, counts: TickCounts) -> None:
    """Plan a resumed campaign's waiting messages again where their plan lies in the past:
    from now, so that the next send comes within one pacing gap."""
    docs = t.store.plans.campaign_waiting(campaign)
    t.store.messages.retire([d for d in docs if done(d)], counts.stats)
    docs = [d for d in docs if not done(d)]
    plan(t, [d for d in docs if d.get("lane") is None], now, counts, resumed=True)
    past = [d for d in docs if d.get("lane") is not None and not _ahead(d, now)]
    lanes = {d["lane"] for d in past if paced(t, d["lane"])}
    for lane in sorted(lanes):
        counts.replanned += replan(t, lane, now)
    times = [(d["_id"], allowed(t.pacing, now, None)[0]) for d in past if d["lane"] not in lanes]
    counts.replanned += t.store.messages.replan(times, None)
    t.store.campaigns.unhold(campaign)
    logger.info("campaign {} resumed: {} message(s) planned again", campaign, len(past))


def drift(t: Context) -> timedelta:
    """How far a paced lane may fall behind its plan before it is planned again."""
    return t.store.timings.lookback / 4


def correct(t: Context, now: datetime, due: dict[str, list[Doc]]) -> int:
    """Plan again the paced lanes that can send and fell behind their plan (an outage, a slow
    WAHA, a poller that was away): whose first due message is more than `drift` late. A
    message waiting to retry does not make its lane late. How many messages moved."""
    moved = 0
    for lane, docs in due.items():
        waiting = [d for d in docs if retry_at(d, now) is None]
        if waiting and paced(t, lane) and waiting[0]["plannedAt"] < now - drift(t):
            moved += replan(t, lane, now)
    return moved


def fill_holes(t: Context, now: datetime, names: Iterable[str]) -> int:
    """Plan again these paced lanes where messages that ended in between (a cancelled
    campaign's) left a hole in their plan: nothing planned soon though the plan goes on,
    unless the cap or the quiet hours make the gap."""
    longest = timedelta(seconds=t.pacing.gap_max + (t.pacing.typing_max if t.pacing.typing else 0))
    horizon = now + longest + drift(t)
    moved = 0
    for lane in sorted(n for n in names if n and paced(t, n)):
        doc = t.store.turns.lane(lane) or {}
        tail = doc.get("tail")
        if not isinstance(tail, datetime) or tail <= horizon or why_not(t, lane) is not None:
            continue
        if t.store.plans.planned_between(lane, now - drift(t), horizon) is not None:
            continue
        today = t.store.turns.slots(doc, now, _day(t, now), fresh=True)
        if allowed(t.pacing, now, _cap(t, lane), today, lane)[0] < horizon:
            moved += replan(t, lane, now)
    return moved


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


def note_blocked(t: Context, due: dict[str, list[Doc]]) -> set[str]:
    """Note why these lanes (with messages due before the next tick) cannot send, where they
    cannot: in the lane and in those messages' lastError, once per reason. The lanes that
    cannot send. Such a lane
    is not planned again: its messages expire once past their deadline, as any message does
    that WAHA or its session could not take in time."""
    blocked = set()
    for lane, docs in due.items():
        reason = why_not(t, lane)
        own = reason is not None and _own_setting(t, lane)
        if reason is not None:
            blocked.add(lane)
        if reason is not None and not own:
            t.store.messages.note([d["_id"] for d in docs if d.get("lastError") != reason], reason)
        was = t.memory.blocked.get(lane, "")
        if reason == was:
            continue
        if not own:
            t.store.turns.block(lane, reason)
        t.memory.blocked[lane] = reason
        if reason is not None:
            logger.info("session '{}' waits: {}", lane, reason)
        elif was:
            logger.info("session '{}' can send again", lane)
    return blocked


def _own_setting(t: Context, lane: str) -> bool:
    """Whether what stops the lane is this process's own setting: WAHA refused its API key,
    or serves none of its routes under its URL. Another poller, with the right settings, may be
    sending for the lane, so nothing shared (the lane's `blocked`, its messages' `lastError`)
    is written; this process only waits, and its log and heartbeat say why."""
    server = t.routes.server_of(lane) or t.routes.sole or t.routes.last_seen.get(lane)
    state = t.servers.states.get(server) if server else None
    refused = state is not None and state.get("keyAccepted") is False
    return refused or server in t.servers.wrong_url


def _ahead(doc: Doc, now: datetime) -> bool:
    planned = doc.get("plannedAt")
    return isinstance(planned, datetime) and planned >= now


def retry_at(doc: Doc, now: datetime) -> datetime | None:
    """When a message waiting to be retried may be claimed again, if that is after `now`."""
    retry = doc.get("retryAt")
    return retry if isinstance(retry, datetime) and retry > now else None


def _due(doc: Doc, now: datetime) -> datetime:
    scheduled = doc.get("scheduledAt")
    return scheduled if isinstance(scheduled, datetime) else now


def _cap(t: Context, lane: str) -> int | None:
    cap = daily_cap(t, lane) if lane else None
    return cap if isinstance(cap, int) else None


def _day(t: Context, now: datetime) -> str:
    return t.pacing.day(now).isoformat()


def _text(doc: Doc) -> str:
    content = doc.get("content")
    return content if isinstance(content, str) else ""


def lanes_of(docs: Iterable[Doc]) -> dict[str, list[Doc]]:
    """Messages by lane, in the order given."""
    by_lane: dict[str, list[Doc]] = {}
    for doc in docs:
        by_lane.setdefault(doc.get("lane") or "", []).append(doc)
    return by_lane
