"""What a new user sees tells the truth: a campaign shows from the moment its messages are
seen, the counts cover every waiting message, lateness is measured against the plan, a message
that cannot be sent fails at once without taking a slot, `poller status` reads at 80 columns,
and one process's wrong key leaves the shared state alone."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from loguru import logger
from support import WRONG_KEY, message, utcnow

from poller import status
from poller.daemon import Poller
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient


def overview(settings: Settings, capsys: Any) -> dict[str, Any]:
    assert status.status(settings, as_json=True) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_a_campaign_shows_before_its_first_send_while_its_session_cannot_send(
    settings: Settings, store: Store, client: WahaClient, waha: WahaSimulator, capsys: Any
) -> None:
    waha.sessions["default"] = "SCAN_QR_CODE"
    campaign = store.campaigns.collection.insert_one({"name": "Menu", "status": "running"})
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=f"44770090000{n}", campaignId=campaign.inserted_id) for n in (1, 2)]
    )
    tick(store, client, 20, now=now)
    assert waha.sent == []
    [shown] = overview(settings, capsys)["campaigns"]
    assert shown["name"] == "Menu" and shown["stats"]["total"] == 2
    # Not paced: each is planned at its scheduledAt, so the last goes then.
    assert datetime.fromisoformat(shown["eta"].replace("Z", "+00:00")) == now


def test_a_campaign_paused_before_any_send_shows_waits_and_resumes(
    settings: Settings, store: Store, client: WahaClient, waha: WahaSimulator, capsys: Any
) -> None:
    campaign = store.campaigns.collection.insert_one({"name": "Sale", "status": "paused"})
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=f"44770090000{n}", campaignId=campaign.inserted_id) for n in (1, 2)]
    )
    tick(store, client, 20, now=now)
    picture = overview(settings, capsys)
    [shown] = picture["campaigns"]
    assert shown["status"] == "paused" and shown["stats"]["total"] == 2
    assert shown["eta"] is None, "nothing of a paused campaign goes out"
    [session] = picture["sessions"]
    assert (session["waiting"], session["paused"], session["nextPlannedAt"]) == (2, 2, None)
    assert session["notSending"] == "its campaigns are paused"
    assert store.campaigns.control(campaign.inserted_id, "running", utcnow())
    tick(store, client, 20, now=now + timedelta(seconds=1))
    assert len(waha.sent) == 2


def test_the_message_counts_cover_every_waiting_message(
    settings: Settings, store: Store, client: WahaClient, waha: WahaSimulator, capsys: Any
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=f"44770090000{n}") for n in (1, 2, 3)]
        + [message(now + timedelta(hours=2), chat_id="447700900009")]
    )
    tick(store, client, 20, now=now, pacing=Pacing(10, 10))
    assert len(waha.sent) == 1
    counts = overview(settings, capsys)["messages"]
    assert counts == {"dueNow": 0, "inProgress": 0, "scheduledLater": 3}, "2 planned, 1 unseen"


def test_lateness_is_measured_against_the_plan_and_pacing_apart(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id="447700900001"), message(now, chat_id="447700900002")]
    )
    pacing = Pacing(30, 30)
    first = tick(store, client, 20, now=now, pacing=pacing)
    second = tick(store, client, 20, now=now + timedelta(seconds=31), pacing=pacing)
    assert (first.sent, second.sent) == (1, 1)
    slots = sorted(d["slotAt"] for d in store.messages.collection.find())
    assert slots[1] - slots[0] == timedelta(seconds=30)
    assert first.lateness == [0.0] and second.lateness == [1.0]
    assert first.pacing_delay == [0.0] and second.pacing_delay == [30.0]
    metrics = Metrics()
    metrics.record(second, 0.1, 0)
    exposed = metrics.registry.get_sample_value(
        "poller_send_pacing_delay_seconds_bucket", {"le": "30.0"}
    )
    assert exposed == 1.0
    assert metrics.registry.get_sample_value("poller_send_lateness_seconds_sum") == 1.0


def test_a_message_that_cannot_be_sent_fails_when_first_seen_and_takes_no_slot(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    now = utcnow()
    bad = [
        message(now, chat_id="not a number"),
        {**message(now, chat_id="447700900008"), "sessionId": "no-such-session", "session": None},
        {**message(now, chat_id="447700900007"), "scheduledAt": "tomorrow"},
    ]
    store.messages.collection.insert_many([*bad, message(now, chat_id="447700900001")])
    store.messages.collection.insert_one(message(now, chat_id="447700900002"))
    try:
        counts = tick(store, client, 20, now=now, pacing=Pacing(10, 10))
    finally:
        logger.remove(sink)
    assert counts.failed == 3 and counts.sent == 1
    failed = [line for line in lines if re.match(r"message \w+ failed: ", line)]
    assert len(failed) == 3, lines
    assert any("scheduledAt must be a date" in line for line in failed)
    plans = sorted(d["plannedAt"] for d in store.messages.collection.find({"status": None}))
    assert plans == [now + timedelta(seconds=10)], "the second good message has the next slot"


def test_status_reads_well_at_80_columns(
    settings: Settings,
    store: Store,
    client: WahaClient,
    waha: WahaSimulator,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    waha.sessions["default"] = "SCAN_QR_CODE"
    campaign = store.campaigns.collection.insert_one({"name": "Weekly menu", "status": "running"})
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=f"44770090000{n}", campaignId=campaign.inserted_id) for n in (1, 2)]
    )
    poller = Poller(settings)
    poller.start()
    poller.tick()
    poller.heartbeat()
    poller.close()
    assert status.status(settings) == 0
    text = capsys.readouterr().out
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert too_wide == [] and "…" not in text
    for header in ("not sending because", "being sent", "failed", "expired", "cancelled"):
        assert header in text
    assert "SCAN_QR_CODE" in text and "Weekly menu" in text


def test_a_wrong_key_of_one_process_leaves_the_shared_state_alone(
    store: Store, waha: WahaSimulator, client: WahaClient, capsys: Any
) -> None:
    waha.api_key = "the-right-key-1234"
    now = utcnow()
    store.messages.collection.insert_one(message(now, chat_id="447700900001"))
    wrong = WahaClient(waha.url, WRONG_KEY, 30)
    try:
        counts = tick(store, wrong, 20, now=now)
    finally:
        wrong.close()
    assert counts.key_rejected and waha.sent == []
    lane = store.turns.collection.find_one({"_id": "default"})
    assert lane is not None and "blocked" not in lane
    doc = store.messages.collection.find_one()
    assert doc is not None and doc.get("lastError") is None
    right = WahaClient(waha.url, "the-right-key-1234", 30)
    try:
        assert tick(store, right, 20, now=now + timedelta(seconds=1)).sent == 1
    finally:
        right.close()
