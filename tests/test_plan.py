"""Planned send times: each waiting message carries `plannedAt`, a message costs a bounded
number of writes however long it waits, a claim round reads only what it claims, plans are
corrected when reality drifts, urgent messages go first, and `poller status` shows the plan.

The ticks run on a fake clock (`now=`), stepping from one planned send to the next.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from pymongo import MongoClient
from support import message, seconds, utcnow

from poller import status
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.store.plans import QUEUE_INDEX
from poller.testing.waha import WahaSimulator
from poller.testing.writes import Writes
from poller.tick import TickCounts, tick
from poller.waha import WahaClient

PACED = Pacing(10, 20)


@pytest.fixture
def watched(settings: Settings, store: Store) -> Iterator[tuple[Store, Writes]]:
    """A store whose writes are counted (`store` made the indexes)."""
    writes = Writes()
    client: MongoClient[dict[str, Any]] = MongoClient(
        settings.mongodb_uri, tz_aware=True, event_listeners=[writes]
    )
    yield Store(client, settings), writes
    client.close()


def campaign(store: Store, at: datetime, n: int, sessions: list[str], **fields: Any) -> Any:
    """A running campaign of `n` messages due at `at`, dealt over `sessions`."""
    found = store.campaigns.collection.insert_one({"name": "Spring", "status": "running"})
    store.messages.collection.insert_many(
        [
            message(
                at,
                chat_id=f"4477{i:08d}",
                session=sessions[i % len(sessions)],
                campaignId=found.inserted_id,
                **fields,
            )
            for i in range(n)
        ]
    )
    return found.inserted_id


def step(
    store: Store, client: WahaClient, now: datetime, pacing: Pacing = PACED
) -> tuple[TickCounts, datetime]:
    """One tick at `now`; the counts, and when the next tick comes (as `poller run` does)."""
    counts = tick(store, client, 20, now=now, pacing=pacing)
    return counts, counts.next_at or now + seconds(30)


def planned(store: Store, **query: Any) -> list[datetime]:
    found = store.messages.collection.find({"plannedAt": {"$exists": True}, **query})
    return sorted(d["plannedAt"] for d in found)


# -- cost -----------------------------------------------------------------------------------------


def test_a_message_costs_one_planning_write_and_three_to_send_however_long_it_waits(
    watched: tuple[Store, Writes], client: WahaClient, waha: WahaSimulator
) -> None:
    store, writes = watched
    waha.sessions = {"s1": "WORKING", "s2": "WORKING"}
    messages = store.messages.collection.name
    start = utcnow()
    campaign(store, start, 60, ["s1", "s2"])
    writes.take(messages)

    counts, now = step(store, client, start)
    assert counts.planned == 60 and counts.sent == 2
    assert writes.take(messages) == 60 + 3 * 2, "one write each to plan, three per send"
    sent = 2
    for k in range(1, 9):  # ticks before the next planned send write nothing to the messages
        counts, _ = step(store, client, start + seconds(k))
        assert counts.sent == 0
    assert writes.take(messages) == 0, "no write for time that passes"
    while sent < 10:
        # The claim's one read: what comes due before the next tick, not the backlog.
        query = {"plannedAt": {"$lte": now + seconds(30)}}
        found = store.messages.collection.find(query, sort=[("plannedAt", 1)], hint=QUEUE_INDEX)
        assert found.explain()["executionStats"]["totalDocsExamined"] <= 8, "not the backlog"
        counts, now = step(store, client, now)
        sent += counts.sent
    assert writes.take(messages) == 3 * (sent - 2)
    assert len(waha.sent) == sent


# -- plans ----------------------------------------------------------------------------------------


def test_each_waiting_message_is_planned_at_the_paced_rate_and_the_campaign_has_an_eta(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    found = campaign(store, start, 6, ["default"])
    step(store, client, start)
    times = planned(store, status={"$ne": "sent"})
    assert len(times) == 5
    gaps = [(b - a).total_seconds() for a, b in zip([start, *times], times, strict=False)]
    assert all(10 <= gap <= 20 for gap in gaps), gaps
    doc = store.campaigns.collection.find_one({"_id": found})
    assert doc["eta"] == times[-1], "the planned time of its last message"

    now = start
    for _ in range(20):
        counts, now = step(store, client, now)
        if not planned(store):
            break
    sent = sorted(d["sentAt"] for d in store.messages.collection.find({"status": "sent"}))
    assert sent[1:] == times, "sent as planned"


def test_a_lane_that_fell_behind_during_an_outage_is_planned_again_not_expired(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    campaign(store, start, 5, ["default"])
    step(store, client, start)
    waha.sessions["default"] = "STARTING"  # 90 s without the session
    for t in range(0, 91, 30):
        assert step(store, client, start + seconds(t))[0].sent == 0
    waha.sessions["default"] = "WORKING"
    back = start + seconds(95)
    counts, _ = step(store, client, back)
    assert counts.replanned >= 3 and counts.expired == 0
    times = planned(store)
    assert times[0] >= back and all(
        10 <= (b - a).total_seconds() <= 20 for a, b in zip(times, times[1:], strict=False)
    )


def test_a_lane_whose_session_stays_away_expires_its_messages_with_the_reason(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    waha.sessions["default"] = "SCAN_QR_CODE"
    campaign(store, start, 2, ["default"])
    step(store, client, start)
    counts, _ = step(store, client, start + seconds(200))
    assert counts.expired == 2
    doc = store.messages.collection.find_one()
    assert "past its planned time" in doc["lastError"] and "SCAN_QR_CODE" in doc["lastError"]


def test_a_hole_left_by_a_cancelled_campaign_is_closed(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    first = campaign(store, start, 20, ["default"])
    step(store, client, start)
    other = store.messages.collection.insert_one(
        message(start + seconds(5), chat_id="447799900001")
    ).inserted_id
    step(store, client, start + seconds(5))
    behind = store.messages.collection.find_one({"_id": other})["plannedAt"]
    assert behind > start + seconds(19 * 10), "planned after the campaign"
    store.campaigns.collection.update_one({"_id": first}, {"$set": {"status": "cancelled"}})
    counts, _ = step(store, client, start + seconds(20))
    assert counts.cancelled == 19
    assert (counts.replanned, counts.sent) == (1, 1), "planned again for now, and sent"
    assert store.messages.collection.find_one({"_id": other})["sentAt"] == start + seconds(20)


def test_a_paused_campaign_keeps_its_place_and_resumes_from_now(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    found = campaign(store, start, 4, ["default"])
    step(store, client, start)
    plan = planned(store, status={"$ne": "sent"})
    store.campaigns.collection.update_one({"_id": found}, {"$set": {"status": "paused"}})
    for k in (1, 60, 600):
        counts, _ = step(store, client, start + seconds(k))
        assert (counts.sent, counts.expired) == (0, 0), "paused: never sent, never late"
    assert planned(store, status={"$ne": "sent"}) == plan, "each keeps its place"
    later = start + seconds(3600)
    store.campaigns.collection.update_one({"_id": found}, {"$set": {"status": "running"}})
    counts, _ = step(store, client, later)
    assert counts.expired == 0 and counts.sent == 1
    assert len(planned(store)) == 2 and planned(store)[0] >= later + seconds(10)


def test_a_campaign_resumed_long_after_its_messages_were_due_is_sent_unpaced_too(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    found = campaign(store, start, 3, ["default"])
    store.campaigns.collection.update_one({"_id": found}, {"$set": {"status": "paused"}})
    assert tick(store, client, 20, now=start).sent == 0
    store.campaigns.collection.update_one({"_id": found}, {"$set": {"status": "running"}})
    counts = tick(store, client, 20, now=start + seconds(3600))
    assert (counts.sent, counts.expired) == (3, 0)


# -- priority -------------------------------------------------------------------------------------


def test_an_urgent_message_goes_at_the_next_turn_ahead_of_a_campaign_across_replicas(
    store: Store, make_settings: Callable[..., Settings], client: WahaClient, waha: WahaSimulator
) -> None:
    rival = Store.connect(make_settings())
    try:
        start = utcnow()
        campaign(store, start, 10, ["default"])
        counts, now = step(store, client, start)
        code = message(now - seconds(5), chat_id="447799912345", content="Your code: 481516")
        code["priority"] = 10
        store.messages.collection.insert_one(code)
        replicas = [rival, store]
        for n in range(12):
            counts, now = step(replicas[n % 2], client, now)
            if len(waha.sent) == 5:
                break
    finally:
        rival.close()
    order = [m.chat_id for m in waha.sent]
    assert order[1] == "447799912345@c.us", "the next turn after it came due"
    assert order[2:] == [f"4477{i:08d}@c.us" for i in (1, 2, 3)], "then the campaign, in order"


def test_priority_must_be_a_number(store: Store, client: WahaClient, waha: WahaSimulator) -> None:
    now = utcnow()
    bad = store.messages.collection.insert_one(message(now, priority="high")).inserted_id
    counts = tick(store, client, 20, now=now)
    doc = store.messages.collection.find_one({"_id": bad})
    assert doc["status"] == "failed" and "priority 'high' is not a number" in doc["lastError"]
    assert counts.failed == 1
    assert waha.sent == []


# -- a database written by the previous version -----------------------------------------------


def test_messages_the_previous_version_held_are_adopted_not_lost(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    now = utcnow()
    old = message(now - seconds(600), chat_id="447700900001", heldUntil=now - seconds(10))
    store.messages.collection.insert_many([old, message(now, chat_id="447700900002")])
    store.turns.collection.insert_one(
        {"_id": "default", "nextAt": now - seconds(1), "count": 3, "day": "2026-11-29"}
    )
    counts, now = step(store, client, now)
    assert counts.expired == 0 and counts.planned == 2
    for _ in range(5):
        counts, now = step(store, client, now)
    assert sorted(m.chat_id for m in waha.sent) == ["447700900001@c.us", "447700900002@c.us"]


# -- poller status --------------------------------------------------------------------------------


def test_status_shows_each_sessions_plan_and_dates_in_iso_8601(
    store: Store,
    settings: Settings,
    client: WahaClient,
    waha: WahaSimulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start = utcnow()
    found = campaign(store, start, 3, ["default"])
    step(store, client, start)
    waha.sessions["default"] = "STARTING"
    step(store, client, start + seconds(1))
    assert status.status(settings, as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    [lane] = shown["sessions"]
    assert lane["session"] == "default" and lane["waiting"] == 2 and lane["sentToday"] == 1
    assert "STARTING" in lane["notSending"]
    assert lane["nextPlannedAt"].endswith("Z") and "T" in lane["nextPlannedAt"]
    [running] = shown["campaigns"]
    assert running["_id"] == str(found) and running["eta"].endswith("Z")
    assert status.status(settings) == 0
    table = capsys.readouterr().out
    assert "WhatsApp sessions" in table and "STARTING" in table
