"""Defects found from outside (a real WAHA, hostile documents, a code review), one test each:
answers that make no sense, a backlog of late messages, cancellations mid-tick, deletions,
hung WAHA calls, odd session names, lost wake-ups, counts, signals and back-off."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from pymongo import MongoClient, monitoring
from support import message, seconds, utcnow

from poller import cli, gate
from poller.daemon import Poller, Stop
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.store.messages import SETTLE_CHUNK
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.timings import Timings
from poller.waha import WahaClient


def get(store: Store, message_id: Any) -> dict[str, Any]:
    doc = store.messages.collection.find_one({"_id": message_id})
    assert doc is not None
    return doc


def chat(n: int) -> str:
    return f"4477{n:08d}@c.us"


# -- 1. an answer that makes no sense ends in a defined outcome -----------------------------------


@pytest.mark.parametrize(
    "answer",
    [(200, "text/html", "<html>proxy</html>"), (200, "application/json", "{}")]
    + [(200, "application/json", '{"id": ""}'), (200, "application/json", '{"id": 7}')],
)
def test_a_message_id_answer_without_an_id_is_retried_never_claimed_again_in_the_tick(
    store: Store, client: WahaClient, waha: WahaSimulator, answer: tuple[int, str, str]
) -> None:
    waha.raw_answers["/api/default/new-message-id"] = answer
    now = utcnow()
    message_id = store.messages.collection.insert_one(message(now)).inserted_id

    counts = tick(store, client, 20, now=now)

    assert (counts.claimed, counts.sent, counts.retried) == (1, 0, 1)
    assert waha.requests_to("/api/sendText") == []
    doc = get(store, message_id)
    assert doc["status"] == "retry" and "new-message-id" in doc["lastError"]


def test_a_tick_never_takes_back_its_own_claims_but_the_next_tick_does(store: Store) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [{**message(now, chat_id=chat(n)), "lane": "default", "plannedAt": now} for n in range(3)]
    )
    ids = [d["_id"] for d in store.plans.planned(now, [], [], 10)]
    assert len(store.messages.claim(ids, now)) == 3
    later = now + seconds(1)
    assert store.plans.lapsed(later, now, 10) == [], "this tick's own claims"
    lapsed = [d["_id"] for d in store.plans.lapsed(later, later, 10)]
    assert len(store.messages.take_over(lapsed, later, later)) == 3, "a failed tick's claims"


# -- 2. a backlog of late messages -----------------------------------------------------------------


class Listener(monitoring.CommandListener):
    """Sees each command as it starts; subclasses say what they do with it."""

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class Writes(Listener):
    """Each settling write (a status set to expired): when, and how many ids it names."""

    def __init__(self) -> None:
        self.settles: list[tuple[float, int]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name != "update":
            return
        for update in event.command["updates"]:
            stages = update["u"] if isinstance(update["u"], list) else []
            if any(s.get("$set", {}).get("status") == "expired" for s in stages):
                self.settles.append((time.time(), len(update["q"]["_id"]["$in"])))


def test_a_backlog_of_late_messages_is_settled_in_chunks_and_never_holds_up_sending(
    settings: Settings, store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    now = utcnow()
    late = 2 * SETTLE_CHUNK + 50
    store.messages.collection.insert_many(
        [message(now - seconds(600), chat_id=chat(n)) for n in range(late)]
    )
    due = store.messages.collection.insert_one(message(now, chat_id=chat(9999))).inserted_id
    writes = Writes()
    watched: MongoClient[dict[str, Any]] = MongoClient(
        settings.mongodb_uri, tz_aware=True, event_listeners=[writes]
    )
    try:
        counts = tick(Store(watched, settings), client, 20, now=now)
    finally:
        watched.close()

    assert get(store, due)["status"] == "sent"
    assert counts.expired == late
    assert max(n for _, n in writes.settles) <= SETTLE_CHUNK, "each write is bounded"
    sent_at = waha.requests_to("/api/sendText")[0].at
    assert writes.settles[0][0] < sent_at < writes.settles[-1][0], "sent between the chunks"
    assert store.messages.collection.count_documents({"status": "expired"}) == late


# -- 3. a cancellation is seen before the next send -----------------------------------------------


def test_a_campaign_cancelled_mid_tick_sends_nothing_more(
    store: Store, client: WahaClient, waha: WahaSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate, "FRESH", 0.0)  # the campaign's status read again before each send
    waha.latency = 0.2
    campaign = store.campaigns.collection.insert_one({"status": "running"}).inserted_id
    now = utcnow()
    docs = [message(now, chat_id=chat(n), campaignId=campaign) for n in range(30)]
    store.messages.collection.insert_many(docs)
    done: list[Any] = []
    ticking = threading.Thread(target=lambda: done.append(tick(store, client, 20, now=now)))
    ticking.start()
    deadline = time.monotonic() + 60
    while len(waha.sent) < 3:
        assert time.monotonic() < deadline, "nothing sent"
        time.sleep(0.01)
    store.campaigns.collection.update_one({"_id": campaign}, {"$set": {"status": "cancelled"}})
    sent_when_cancelled = len(waha.sent)
    ticking.join(timeout=120)

    assert len(waha.sent) <= sent_when_cancelled + 1, "only the send in flight went on"
    counts = done[0]
    assert counts.sent + counts.cancelled == 30
    assert store.messages.collection.count_documents({"status": "cancelled"}) == counts.cancelled


# -- 4. a campaign whose last open message is deleted completes ----------------------------------


def test_a_campaign_completes_when_the_web_app_deletes_its_last_open_message(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    campaign = store.campaigns.collection.insert_one({"status": "running"}).inserted_id
    draft = store.campaigns.collection.insert_one({"status": "draft"}).inserted_id
    now = utcnow()
    store.messages.collection.insert_one(message(now, campaignId=campaign))
    later = store.messages.collection.insert_one(
        message(now + seconds(3600), chat_id=chat(1), campaignId=campaign)
    ).inserted_id
    assert tick(store, client, 20, now=now).sent == 1
    store.messages.collection.delete_one({"_id": later})

    tick(store, client, 20, now=now + seconds(6 * 60))

    found = store.campaigns.collection.find_one({"_id": campaign})
    assert found is not None and found["status"] == "completed"
    assert found["stats"]["total"] == found["stats"]["sent"] == 1
    untouched = store.campaigns.collection.find_one({"_id": draft})
    assert untouched == {"_id": draft, "status": "draft"}, "a campaign never worked on"


# -- 5. the heartbeat does not wait for WAHA ------------------------------------------------------


def test_the_heartbeat_asks_only_mongodb(settings: Settings, waha: WahaSimulator) -> None:
    instance = Poller(settings)
    instance.start()
    try:
        instance.tick()
        asked = len(waha.requests)
        waha.listing_delay = 60.0  # WAHA hangs from now on
        instance.heartbeat()
        beat = instance.store.heartbeats.collection.find_one({"_id": instance.store.owner})
    finally:
        waha.listing_delay = 0.0
        instance.close()
    assert len(waha.requests) == asked, "no request to WAHA"
    assert beat is not None and beat["wahaSessions"] == [{"name": "default", "status": "WORKING"}]


# -- 6, 7, 8: session names -----------------------------------------------------------------------


def test_odd_session_names_reach_their_own_route_and_never_switch_message_ids_off(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    waha.sessions.update({"..": "WORKING", ".": "WORKING"})
    now = utcnow()
    store.messages.collection.insert_many(
        [
            message(now, chat_id=chat(1), session=".."),
            message(now, chat_id=chat(2), session="."),
            message(now + seconds(1), chat_id=chat(3)),
        ]
    )
    assert tick(store, client, 20, now=now + seconds(1)).sent == 3
    assert {r.path for r in waha.requests_to("/api/%2E%2E/new-message-id")} | {
        r.path for r in waha.requests_to("/api/%2E/new-message-id")
    } == {"/api/%2E%2E/new-message-id", "/api/%2E/new-message-id"}
    assert all(json.loads(r.body).get("id") for r in waha.requests_to("/api/sendText"))


def test_a_session_waha_does_not_list_burns_no_turn_and_no_daily_count(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    now = utcnow()
    message_id = store.messages.collection.insert_one(message(now, session="sales")).inserted_id

    counts = tick(store, client, 20, now=now, pacing=Pacing(10, 20, daily_cap=5))

    assert (counts.claimed, counts.retried) == (0, 0)
    assert waha.message_requests() == []
    lane = store.turns.collection.find_one({"_id": "sales"})
    assert lane is not None and "nextAt" not in lane and "count" not in lane
    assert "WAHA has no WhatsApp session 'sales'" in get(store, message_id)["lastError"]


def test_one_rule_names_the_session_for_claim_hold_pacing_and_send(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    waha.sessions["default"] = "SCAN_QR_CODE"
    store.sessions.collection.insert_one({"_id": "s1", "name": " default "})
    now = utcnow()
    ids = store.messages.collection.insert_many(
        [
            message(now, chat_id=chat(1), session="default "),
            message(now, chat_id=chat(2), session=None, sessionId="s1"),
        ]
    ).inserted_ids
    assert tick(store, client, 20, now=now).claimed == 0, "its session is blocked"
    for message_id in ids:
        assert "'default' is SCAN_QR_CODE" in get(store, message_id)["lastError"]

    waha.sessions["default"] = "WORKING"
    counts = tick(store, client, 20, now=now + seconds(1), pacing=Pacing(10, 10))
    assert (counts.claimed, counts.sent) == (1, 1), "one session, one paced turn"
    assert [json.loads(r.body)["session"] for r in waha.requests_to("/api/sendText")] == ["default"]


# -- 9. a turn that ends while the tick runs ------------------------------------------------------


class TurnGivenBack(Listener):
    """Another poller gives the turn of `default` back (at `start` + 1 s) just after this tick
    read that it was busy; the fake clock then reads `start` + 2 s."""

    def __init__(self, store: Store, start: datetime) -> None:
        self.store, self.start, self.now = store, start, start
        self.reads: set[int] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        wanted = event.command_name == "find" and "nextAt" in event.command.get("filter", {})
        if wanted and self.now == self.start:
            self.reads.add(event.request_id)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.request_id in self.reads and self.now == self.start:
            turn = {"$set": {"nextAt": self.start + seconds(1)}}
            self.store.turns.collection.update_one({"_id": "default"}, turn)
            self.now = self.start + seconds(2)


def test_a_turn_that_ends_during_the_tick_is_the_next_tick_time(
    settings: Settings, store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    store.messages.collection.insert_one(message(start))
    store.turns.collection.insert_one({"_id": "default", "nextAt": start + seconds(100)})
    listener = TurnGivenBack(store, start)
    watched: MongoClient[dict[str, Any]] = MongoClient(
        settings.mongodb_uri, tz_aware=True, event_listeners=[listener]
    )
    try:
        counts = tick(
            Store(watched, settings), client, 20, pacing=Pacing(5, 5), clock=lambda: listener.now
        )
    finally:
        watched.close()

    assert counts.claimed == 0 and listener.now == start + seconds(2)
    assert counts.next_at == start + seconds(1), "due already: tick again at once"


# -- 10. typing: WAHA's real answer is read and heeded --------------------------------------------


def test_a_session_that_cannot_type_now_is_retried_not_sent_without_typing(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    body = {"error": "Session status is not as expected", "status": "STARTING"}
    waha.raw_answers["/api/sendSeen"] = (422, "application/json", json.dumps(body))
    message_id = store.messages.collection.insert_one(message(utcnow())).inserted_id

    counts = tick(store, client, 20, pacing=Pacing(typing=True, typing_max=0.1))

    assert (counts.sent, counts.retried) == (0, 1)
    assert waha.requests_to("/api/sendText") == []
    assert "is STARTING, not WORKING" in get(store, message_id)["lastError"]


# -- 11. counts that add up -----------------------------------------------------------------------


def test_cancelled_in_doubt_messages_are_counted_unknown(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    campaign = store.campaigns.collection.insert_one({"status": "cancelled"}).inserted_id
    now = utcnow()
    store.messages.collection.insert_many(
        [
            message(now, chat_id=chat(1), campaignId=campaign),
            message(now, chat_id=chat(2), campaignId=campaign, inDoubt=True, status="retry"),
        ]
    )
    counts = tick(store, client, 20, now=now)
    assert (counts.cancelled, counts.unknown) == (1, 1)


def test_due_counts_held_messages_too(store: Store) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [
            message(now - seconds(5), chat_id=chat(1)),
            message(now - seconds(90), chat_id=chat(2), heldUntil=now - seconds(5)),
            message(now + seconds(60), chat_id=chat(3)),
        ]
    )
    assert store.plans.count_due(now) == 2


# -- 13. a key pasted with an invisible character -------------------------------------------------


def test_a_non_ascii_api_key_is_a_configuration_error_that_names_the_variable(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MONGODB_URI", settings.mongodb_uri)
    monkeypatch.setenv("MONGODB_DB", settings.mongodb_db)
    monkeypatch.setenv("WAHA_API_KEY", "secret\u200bkey")
    assert cli.main(["once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WAHA_API_KEY" in err[0] and "secret" not in err[0]


# -- 14. the signal handlers only note the signal -------------------------------------------------


def test_signal_handlers_only_note_the_signal_and_a_thread_acts_on_it() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    try:
        with Stop() as stop:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler)
            handler(signal.SIGTERM, None)  # as the interpreter would call it
            assert stop.signal == "SIGTERM" and not stop.is_set() and lines == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.wait(30)
        assert signal.getsignal(signal.SIGTERM) is not handler, "the previous handler is back"
    finally:
        logger.remove(sink)
    assert any("received SIGTERM" in line for line in lines)


# -- 15. retries back off -------------------------------------------------------------------------


def test_retries_back_off_with_the_attempts_capped_and_jittered(settings: Settings) -> None:
    timings = Timings.from_settings(settings)
    retry = seconds(settings.retry_seconds)
    for attempts, factor in ((0, 1), (1, 1), (2, 2), (3, 4), (4, 8), (50, 8)):
        waits = {timings.retry_delay(attempts) for _ in range(50)}
        assert all(retry * factor / 2 <= w <= retry * factor for w in waits)
        assert len(waits) > 1, "jittered"


def test_a_message_failing_again_waits_longer(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    waha.raw_answers["/api/sendText"] = (429, "application/json", '{"message": "slow down"}')
    now = utcnow()
    message_id = store.messages.collection.insert_one(message(now, attempts=2)).inserted_id

    assert tick(store, client, 20, now=now).retried == 1

    retry_at = get(store, message_id)["retryAt"]
    assert now + seconds(60) <= retry_at <= now + seconds(120), "the third failure waits 4x"
