"""Humanized sending: per-session pacing, typing, the daily cap, quiet hours, campaign control.

Most tests run the tick on a fake clock (`now=`): they step from one session's turn to the next
as `poller run` would, so 30 minutes of pacing take a few seconds. What WAHA saw is read from
the simulator; what happened to each message, from MongoDB.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pymongo.errors import WriteError
from support import POLLER, environment, message, replicas, seconds, utcnow, wait_until

from poller.daemon import Poller
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import Request, WahaSimulator
from poller.tick import TickCounts, tick
from poller.waha import WahaClient

ROME = ZoneInfo("Europe/Rome")


def ticks(
    store: Store, client: WahaClient, pacing: Pacing, start: datetime, end: datetime | None = None
) -> list[TickCounts]:
    """Tick at `start`, then at each session's next turn (as `poller run` does), until nothing
    waits for a turn or the next turn is after `end`."""
    now, done = start, []
    for _ in range(1000):
        counts = tick(store, client, 20, now=now, pacing=pacing)
        done.append(counts)
        if counts.next_at is None or (end is not None and counts.next_at > end):
            return done
        now = counts.next_at
    raise AssertionError("still ticking after 1000 ticks")


def schedule(store: Store, at: datetime, n: int, **fields: Any) -> list[Any]:
    docs = [
        message(at, chat_id=f"4477009{i:05d}@c.us", content=f"Hi {i}", **fields) for i in range(n)
    ]
    return list(store.messages.collection.insert_many(docs).inserted_ids)


def by_status(store: Store, **query: Any) -> dict[str, int]:
    found: dict[str, int] = {}
    for doc in store.messages.collection.find(query):
        found[doc.get("status", "pending")] = found.get(doc.get("status", "pending"), 0) + 1
    return found


def sent_times(store: Store, session: str = "default") -> list[datetime]:
    docs = store.messages.collection.find({"status": "sent", "session": session}).sort("sentAt", 1)
    return [d["sentAt"] for d in docs]


def gaps(times: list[Any]) -> list[float]:
    return [
        (b - a).total_seconds() if isinstance(a, datetime) else b - a
        for a, b in zip(times, times[1:], strict=False)
    ]


# -- pacing -------------------------------------------------------------------------------------


def test_a_campaign_inserted_at_once_is_sent_whole_at_the_paced_rate(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    """20 messages with one scheduledAt, default pacing: about 5.5 minutes, none expired; a
    message already too old when the poller first saw it still expires."""
    start = utcnow()
    campaign = store.campaigns.collection.insert_one(
        {"name": "Launch", "status": "running"}
    ).inserted_id
    schedule(store, start, 20, campaignId=campaign)
    stale = store.messages.collection.insert_one(
        message(start - seconds(121), chat_id="447700900999")
    )

    ticks(store, client, Pacing(10, 25), start)

    assert by_status(store, campaignId=campaign) == {"sent": 20}
    assert (
        store.messages.collection.find_one({"_id": stale.inserted_id}, {"status": 1})["status"]
        == "expired"
    )
    spacing = gaps(sent_times(store))
    assert min(spacing) >= 10 and max(spacing) <= 25
    took = (sent_times(store)[-1] - start).total_seconds() / 60
    assert 19 * 10 / 60 <= took <= 19 * 25 / 60  # about 5.5 minutes at a mean gap of 17.5 s
    print(
        f"20 messages in {took:.1f} min of fake time; gaps {min(spacing):.1f}-{max(spacing):.1f} s"
    )
    assert len(waha.sent) == 20
    stats = store.campaigns.collection.find_one({"_id": campaign})
    assert stats["status"] == "completed" and stats["stats"]["sent"] == 20


def test_sessions_are_paced_independently(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    """4 sessions with 6 messages each finish when one session with 6 does."""
    waha.sessions = {f"s{n}": "WORKING" for n in range(4)}
    start = utcnow()
    schedule(store, start, 6, session="s0")
    ticks(store, client, Pacing(10, 10), start)
    alone = sent_times(store, "s0")[-1]

    store.messages.collection.delete_many({})
    store.turns.collection.delete_many({})
    for n in range(4):
        schedule(store, start, 6, session=f"s{n}")
    ticks(store, client, Pacing(10, 10), start)

    assert by_status(store) == {"sent": 24}
    finished = [sent_times(store, f"s{n}")[-1] for n in range(4)]
    assert alone == start + seconds(50)
    assert max(finished) == alone, "four sessions take no longer than one"
    for n in range(4):
        assert gaps(sent_times(store, f"s{n}")) == [10.0] * 5


def test_gaps_between_one_sessions_sends_as_waha_sees_them(
    make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    """On the wall clock, through `poller once`'s loop: every gap inside the configured range."""
    settings = make_settings(pacing_min_seconds=0.3, pacing_max_seconds=0.6)
    poller = Poller(settings)
    poller.start()
    poller.store.messages.collection.insert_many(
        [message(utcnow(), chat_id=f"4477009000{n:02d}") for n in range(10)]
    )
    try:
        poller.ticks_until(datetime.now(UTC) + seconds(30), threading.Event())
    finally:
        poller.close()

    arrivals = [r.at for r in waha.requests_to("/api/sendText")]
    assert len(arrivals) == 10 and len(waha.sent) == 10
    spacing = gaps(arrivals)
    assert min(spacing) >= 0.3
    print(
        f"gaps: min {min(spacing):.3f} s, median {statistics.median(spacing):.3f} s, "
        f"max {max(spacing):.3f} s (configured 0.3-0.6 s)"
    )


def test_three_replicas_never_send_for_one_session_closer_than_the_minimum(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    waha.sessions = {"a": "WORKING", "b": "WORKING"}
    now = utcnow()
    for session in "ab":
        schedule(store, now, 8, session=session)
    env = environment(
        settings, PACING_MIN_SECONDS="0.4", PACING_MAX_SECONDS="0.6", POLL_INTERVAL_SECONDS="1"
    )
    with replicas([env] * 3, tmp_path) as codes:
        wait_until(lambda: len(waha.sent) >= 16, 120, "16 sends")

    assert codes == [0, 0, 0]
    assert by_status(store) == {"sent": 16} and len(waha.sent) == 16
    for session in "ab":
        arrivals = [m.at for m in waha.sent if m.session == session]
        assert min(gaps(arrivals)) >= 0.4, f"session {session}: {gaps(arrivals)}"
    senders = {d["pickedBy"] for d in store.messages.collection.find()}
    assert len(senders) >= 2, "the replicas took turns"


def test_poller_run_wakes_for_each_turn_not_on_its_timer(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    schedule(store, utcnow(), 6)
    # Its timer ticks once, at the start: every later send comes from a wake-up for a turn.
    env = environment(
        settings,
        PACING_MIN_SECONDS="0.3",
        PACING_MAX_SECONDS="0.5",
        POLL_INTERVAL_SECONDS="3600",
        LOOKBACK_SECONDS="3600",  # however slow the machine, none expires
    )
    with (tmp_path / "poller.log").open("w") as log:
        daemon = subprocess.Popen([*POLLER, "run"], env=env, cwd=tmp_path, stderr=log)
        try:
            wait_until(lambda: len(waha.sent) >= 6, 180, "six turns")
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
    assert by_status(store) == {"sent": 6}
    assert min(gaps([m.at for m in waha.sent])) >= 0.3


@pytest.fixture
def rival(make_settings: Callable[..., Settings]) -> Iterator[Store]:
    """Another poller's store, on the same database."""
    other = Store.connect(make_settings())
    yield other
    other.close()


def test_a_turn_taken_by_one_replica_is_busy_for_the_others(store: Store, rival: Store) -> None:
    now = utcnow()
    assert store.turns.reserve("default", now, "2026-11-25", None) == "taken"
    assert rival.turns.reserve("default", now, "2026-11-25", None) == "busy"
    store.turns.end("default", now + seconds(12), sent=True)
    assert rival.turns.reserve("default", now + seconds(11), "2026-11-25", None) == "busy"
    assert rival.turns.reserve("default", now + seconds(12), "2026-11-25", None) == "taken"
    assert rival.turns.reserve("other", now, "2026-11-25", None) == "taken"


def race(make_settings: Callable[..., Settings], n: int, work: Callable[[Store], None]) -> None:
    """Run `work` in `n` replicas (each its own connection), released at once by a barrier."""
    replicas = [Store.connect(make_settings()) for _ in range(n)]
    start = threading.Barrier(n)

    def run(replica: Store) -> None:
        start.wait()
        work(replica)

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for replica in replicas:
        replica.close()


def test_of_replicas_racing_for_a_turn_exactly_one_gets_it(
    make_settings: Callable[..., Settings],
) -> None:
    now = utcnow()
    got: list[str] = []
    race(
        make_settings, 6, lambda r: got.append(r.turns.reserve("default", now, "2026-11-25", None))
    )
    assert sorted(got) == ["busy"] * 5 + ["taken"]


def test_of_replicas_racing_under_a_cap_exactly_the_cap_send(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    now = utcnow()
    taken: list[str] = []

    def take_turns(replica: Store) -> None:
        for _ in range(5):  # take a turn, give it back at once, again
            if replica.turns.reserve("default", now, "2026-11-25", 3) == "taken":
                taken.append(replica.owner)
                replica.turns.end("default", now, sent=True)

    race(make_settings, 4, take_turns)
    assert len(taken) == 3
    assert store.turns.collection.find_one({"_id": "default"})["count"] == 3


def test_a_turn_that_lapsed_before_the_send_is_not_used(store: Store, rival: Store) -> None:
    now = utcnow()
    assert store.turns.reserve("default", now, "2026-11-25", None) == "taken"
    late = now + store.timings.turn_hold  # the message id and the typing took that long
    assert rival.turns.reserve("default", late, "2026-11-25", None) == "taken"
    assert store.turns.fence("default", late) is False, "the rival sends; this poller must not"
    assert rival.turns.fence("default", late) is True
    assert store.turns.reserve("default", late + seconds(1), "2026-11-25", None) == "busy"


def test_an_error_after_the_send_still_paces_the_session(
    store: Store, client: WahaClient, waha: WahaSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    schedule(store, now, 2)

    def refuse(*args: Any, **kwargs: Any) -> bool:
        raise WriteError("Document failed validation", 121)

    monkeypatch.setattr(store.messages, "sent", refuse)  # a schema validator refuses `sent`
    counts = tick(store, client, 20, now=now, pacing=Pacing(10, 10))

    assert len(waha.sent) == 1, "the second message waits for the gap"
    assert counts.unknown == 1
    turn = store.turns.collection.find_one({"_id": "default"})
    assert turn["nextAt"] == now + seconds(10) and turn["count"] == 1


# -- typing -------------------------------------------------------------------------------------


def test_typing_marks_seen_types_pauses_then_sends(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    store.messages.collection.insert_one(message(utcnow(), content="See you at ten"))
    tick(store, client, 20, pacing=Pacing(typing=True, typing_max=0.3))

    steps = [r for r in waha.message_requests() if r.method == "POST"]
    assert [r.path for r in steps] == [
        "/api/sendSeen",
        "/api/startTyping",
        "/api/stopTyping",
        "/api/sendText",
    ]
    assert all(r.json()["chatId"] == "447700900123@c.us" for r in steps)
    assert steps[2].at - steps[1].at >= 0.3, "typing lasts the pause"
    assert len(waha.sent) == 1


def test_a_stop_while_typing_gives_the_message_back_unsent(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    message_id = store.messages.collection.insert_one(message(utcnow())).inserted_id
    stop = threading.Event()
    validate = waha.validator

    def stop_while_typing(request: Request) -> str | None:
        if request.path == "/api/startTyping":
            stop.set()  # SIGTERM arrives during the 5 s pause
        return validate(request) if validate else None

    waha.validator = stop_while_typing

    counts = tick(store, client, 20, stop=stop, pacing=Pacing(typing=True, typing_max=5))

    steps = [r.path for r in waha.message_requests() if r.method == "POST"]
    assert steps == ["/api/sendSeen", "/api/startTyping", "/api/stopTyping"]
    assert (counts.sent, counts.released) == (0, 1) and waha.sent == []
    doc = store.messages.collection.find_one({"_id": message_id})
    assert doc["status"] == "pending" and doc["isPicked"] is False


def test_typing_pause_grows_with_the_text_and_is_bounded() -> None:
    pacing = Pacing(typing=True, typing_max=8)
    short, longer, huge = (pacing.typing_pause("x" * n) for n in (10, 100, 10_000))
    assert 1 <= short < longer < huge == 8


def test_sessions_type_side_by_side(store: Store, client: WahaClient, waha: WahaSimulator) -> None:
    waha.sessions = {"a": "WORKING", "b": "WORKING", "c": "WORKING"}
    for session in "abc":
        store.messages.collection.insert_one(message(utcnow(), session=session))
    tick(store, client, 20, pacing=Pacing(typing=True, typing_max=2))

    order = [r.path for r in waha.message_requests() if "Typing" in r.path]
    assert order == ["/api/startTyping"] * 3 + ["/api/stopTyping"] * 3
    assert len(waha.sent) == 3


def test_an_engine_that_cannot_type_still_sends(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    waha.chat_actions = False
    store.messages.collection.insert_one(message(utcnow()))
    tick(store, client, 20, pacing=Pacing(typing=True, typing_max=5))
    steps = [r.path for r in waha.message_requests() if r.method == "POST"]
    assert steps == ["/api/sendSeen", "/api/sendText"], "no pause without typing"
    assert len(waha.sent) == 1


# -- the daily cap --------------------------------------------------------------------------------


def test_the_daily_cap_holds_the_rest_until_the_next_local_day(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    evening = datetime(2026, 11, 25, 23, 50, tzinfo=ROME).astimezone(UTC)
    ids = schedule(store, evening, 5)
    pacing = Pacing(daily_cap=3, zone=ROME)

    first = tick(store, client, 20, now=evening, pacing=pacing)
    assert (first.sent, first.held) == (3, 2), "planned for the next day from the start"
    midnight = datetime(2026, 11, 26, tzinfo=ROME).astimezone(UTC)
    for doc in store.messages.collection.find({"_id": {"$in": ids}, "status": {"$ne": "sent"}}):
        assert doc["plannedAt"] == midnight and doc["isPicked"] is False
        assert "daily cap of 3" in doc["lastError"]

    assert tick(store, client, 20, now=midnight - seconds(1), pacing=pacing).sent == 0
    after = tick(store, client, 20, now=midnight + seconds(1), pacing=pacing)
    assert (after.sent, after.expired) == (2, 0), "held past the lookback, yet not expired"
    assert by_status(store) == {"sent": 5}
    assert len(waha.sent) == 5


def test_a_session_document_sets_its_own_cap(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    waha.sessions = {name: "WORKING" for name in ("new", "odd", "old", "off")}
    store.sessions.collection.insert_many(
        [
            {"name": "new", "dailyCap": 1},
            {"name": "odd", "dailyCap": "lots"},
            {"name": "old"},
            {"name": "off", "dailyCap": 0},
        ]
    )
    now = utcnow()
    for session in ("new", "odd", "old", "off"):
        schedule(store, now, 3, session=session)

    tick(store, client, 20, now=now, pacing=Pacing(daily_cap=2))

    assert len(sent_times(store, "new")) == 1, "the session's dailyCap wins over DAILY_CAP"
    assert len(sent_times(store, "old")) == 2, "DAILY_CAP applies without one"
    assert sent_times(store, "odd") == sent_times(store, "off") == []
    odd = store.messages.collection.find_one({"session": "odd"})
    assert "dailyCap 'lots'" in odd["lastError"] and odd["isPicked"] is False
    # Not the poller's hold: these wait like a session that is not WORKING, then expire.
    later = tick(store, client, 20, now=now + seconds(121), pacing=Pacing(daily_cap=2))
    assert later.expired == 6
    off = store.messages.collection.find_one({"session": "off"})
    assert off["status"] == "expired" and "is 0: it sends nothing" in off["lastError"]


def test_pacing_and_the_cap_together(store: Store, client: WahaClient, waha: WahaSimulator) -> None:
    start = utcnow()
    schedule(store, start, 4)
    ticks(store, client, Pacing(10, 10, daily_cap=2), start, end=start + seconds(60))
    assert sent_times(store) == [start, start + seconds(10)]
    assert by_status(store) == {"sent": 2, "pending": 2}


def test_the_cap_holds_across_replicas(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    now = utcnow()
    rival = Store.connect(make_settings())
    taken = []
    try:
        for replica in (store, rival, store, rival):
            taken.append(replica.turns.reserve("default", now, "2026-11-25", 2))
            replica.turns.end("default", now, sent=True)
    finally:
        rival.close()
    assert taken == ["taken", "taken", "capped", "capped"]
    assert store.turns.reserve("default", now, "2026-11-26", 2) == "taken", "a new day, a new count"
    assert store.turns.reserve("fresh", now, "2026-11-26", 0) == "capped", (
        "a cap of 0 sends nothing"
    )


# -- quiet hours ----------------------------------------------------------------------------------


def test_quiet_hours_hold_messages_overnight_then_send_them_paced(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    night = datetime(2026, 11, 25, 22, 30, tzinfo=ROME).astimezone(UTC)
    schedule(store, night, 3)
    pacing = Pacing(10, 10, zone=ROME, quiet_hours=(time(22), time(8)))

    first = tick(store, client, 20, now=night + seconds(5), pacing=pacing)
    assert (first.sent, first.held) == (0, 3)
    morning = datetime(2026, 11, 26, 8, 0, tzinfo=ROME).astimezone(UTC)
    doc = store.messages.collection.find_one()
    assert (
        doc["plannedAt"] == morning and "quiet hours (22:00-08:00 Europe/Rome)" in doc["lastError"]
    )
    assert tick(store, client, 20, now=morning - seconds(3600 * 5), pacing=pacing).sent == 0

    ticks(store, client, pacing, morning)

    assert by_status(store) == {"sent": 3}
    assert sent_times(store) == [morning, morning + seconds(10), morning + seconds(20)]


def test_quiet_hours_arithmetic() -> None:
    pacing = Pacing(zone=ROME, quiet_hours=(time(22), time(8)))

    def local(h: int, m: int = 0, day: int = 25) -> datetime:
        return datetime(2026, 11, day, h, m, tzinfo=ROME).astimezone(UTC)

    assert pacing.quiet_until(local(21, 59)) is None
    assert pacing.quiet_until(local(22)) == local(8, day=26)
    assert pacing.quiet_until(local(3)) == local(8)
    assert pacing.quiet_until(local(8)) is None
    lunch = Pacing(zone=ROME, quiet_hours=(time(13), time(14, 30)))
    assert lunch.quiet_until(local(13, 15)) == local(14, 30)
    assert lunch.quiet_until(local(23)) is None
    assert pacing.next_day(local(23, 59)) == local(0, day=26)
    # The day the cap counts is the local one: 23:30 UTC is already the next day in Rome.
    assert pacing.day(datetime(2026, 11, 25, 23, 30, tzinfo=UTC)).isoformat() == "2026-11-26"


def test_a_held_message_the_web_app_reschedules_goes_at_its_new_time(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    night = datetime(2026, 11, 25, 23, 0, tzinfo=ROME).astimezone(UTC)
    [message_id] = schedule(store, night, 1)
    pacing = Pacing(zone=ROME, quiet_hours=(time(22), time(8)))
    assert tick(store, client, 20, now=night, pacing=pacing).held == 1
    next_week = night + seconds(7 * 86400 - 3600 * 10)  # a week later, at 13:00
    store.messages.collection.update_one({"_id": message_id}, {"$set": {"scheduledAt": next_week}})

    morning = datetime(2026, 11, 26, 8, 5, tzinfo=ROME).astimezone(UTC)
    assert tick(store, client, 20, now=morning, pacing=pacing).expired == 0
    assert tick(store, client, 20, now=next_week, pacing=pacing).sent == 1
    assert store.messages.collection.find_one({"_id": message_id})["sentAt"] == next_week


# -- campaign control -----------------------------------------------------------------------------


def test_a_paused_campaign_outlasts_a_waha_outage(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    campaign = store.campaigns.collection.insert_one(
        {"name": "Drip", "status": "paused"}
    ).inserted_id
    paused = schedule(store, start, 2, campaignId=campaign)
    alone = store.messages.collection.insert_one(message(start, chat_id="447700900999")).inserted_id
    waha.stop()  # WAHA is down for the next ten minutes
    for step in range(21):
        tick(store, client, 20, now=start + seconds(30 * step), pacing=Pacing(10, 25))

    assert by_status(store, _id={"$in": paused}) == {"pending": 2}, "paused: not expired"
    assert store.messages.collection.find_one({"_id": alone})["status"] == "expired"


def test_a_paused_campaign_waits_without_expiring_then_resumes_paced(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    start = utcnow()
    campaign = store.campaigns.collection.insert_one(
        {"name": "Drip", "status": "running"}
    ).inserted_id
    schedule(store, start, 6, campaignId=str(campaign))  # referenced by its hex string
    pacing = Pacing(10, 10)

    ticks(store, client, pacing, start, end=start + seconds(10))
    assert len(waha.sent) == 2
    store.campaigns.collection.update_one({"_id": campaign}, {"$set": {"status": "paused"}})
    for minute in range(1, 31):  # half an hour paused: far past the lookback window
        counts = tick(store, client, 20, now=start + seconds(15 + 60 * minute), pacing=pacing)
        assert (counts.sent, counts.expired) == (0, 0)

    store.campaigns.collection.update_one({"_id": campaign}, {"$set": {"status": "running"}})
    resumed = start + seconds(15 + 60 * 31)
    ticks(store, client, pacing, resumed)

    assert by_status(store) == {"sent": 6}
    assert sent_times(store)[2:] == [resumed + seconds(10 * n) for n in range(4)]
    stats = store.campaigns.collection.find_one({"_id": campaign})
    assert stats["status"] == "completed" and stats["stats"]["sent"] == 6


def test_a_cancelled_campaign_ends_its_unsent_messages_cancelled(
    store: Store,
    client: WahaClient,
    waha: WahaSimulator,
    make_settings: Callable[..., Settings],
) -> None:
    start = utcnow()
    campaign = store.campaigns.collection.insert_one(
        {"name": "Promo", "status": "running"}
    ).inserted_id
    ids = schedule(store, start, 6, campaignId=campaign)
    store.messages.collection.insert_one(
        message(start + seconds(3600), campaignId=campaign)
    )  # later
    doubt = message(start, chat_id="447700900888", campaignId=campaign, status="retry")
    doubt.update(inDoubt=True, retryAt=start + seconds(600), sendId="AAA")  # timed out before
    doubtful = store.messages.collection.insert_one(doubt).inserted_id
    pacing = Pacing(10, 10)
    ticks(store, client, pacing, start, end=start + seconds(10))
    assert len(waha.sent) == 2
    # Another poller has claimed the next message and is about to send it.
    rival = Store.connect(make_settings())
    first = start + seconds(20)
    waiting = [d for d in rival.plans.planned(first, [], [], 20) if not d.get("isPicked")]
    [due] = [d for d in waiting if "retryAt" not in d][:1]
    [claimed] = rival.messages.claim([due["_id"]], first)

    store.campaigns.collection.update_one({"_id": campaign}, {"$set": {"status": "cancelled"}})
    counts = tick(store, client, 20, now=start + seconds(21), pacing=pacing)
    assert counts.cancelled == 4 and counts.sent == 0
    # The rival sees the cancellation before its send: its claim ends cancelled, not sent.
    counts = tick(rival, client, 20, now=start + seconds(22), pacing=pacing)
    assert counts.cancelled == 1 and counts.sent == 0
    assert rival.messages.status_of(claimed["_id"]) == "cancelled"
    rival.close()
    ticks(store, client, pacing, start + seconds(3601))
    assert len(waha.sent) == 2
    assert by_status(store, campaignId=campaign) == {"sent": 2, "cancelled": 5, "unknown": 1}
    unsure = store.messages.collection.find_one({"_id": doubtful})
    assert "may have reached WhatsApp" in unsure["lastError"]
    doc = store.messages.collection.find_one({"_id": ids[-1]})
    assert doc["lastError"] == "Not sent: its campaign was cancelled." and doc["isPicked"] is True
    done = store.campaigns.collection.find_one({"_id": campaign})
    assert done["status"] == "cancelled" and "completedAt" in done
    assert done["stats"] == {
        "total": 8,
        "sent": 2,
        "failed": 1,
        "expired": 0,
        "unknown": 1,
        "cancelled": 5,
        "delivered": 0,
        "read": 0,
        "deliveryFailed": 0,
    }


# -- media ---------------------------------------------------------------------------------------


def test_media_goes_through_send_image_and_send_file(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    now = utcnow()
    image = {"url": "https://example.com/sale.jpg", "mimetype": "image/jpeg", "caption": "Sale!"}
    pdf = {"data": "JVBERi0xLjQK", "mimetype": "application/pdf", "filename": "menu.pdf"}
    store.messages.collection.insert_many(
        [
            message(now, chat_id="447700900001", content="", media=image),
            message(now, chat_id="447700900002", content="Tonight's menu", media=pdf),
        ]
    )

    assert tick(store, client, 20, now=now).sent == 2

    by_chat = {m.chat_id: m for m in waha.sent}
    photo, document = by_chat["447700900001@c.us"], by_chat["447700900002@c.us"]
    assert photo.route == "/api/sendImage" and photo.text == "Sale!"
    assert photo.file == {"mimetype": "image/jpeg", "url": "https://example.com/sale.jpg"}
    assert document.route == "/api/sendFile" and document.text == "Tonight's menu"
    assert document.file == {
        "mimetype": "application/pdf",
        "data": "JVBERi0xLjQK",
        "filename": "menu.pdf",
    }
    assert waha.requests_to("/api/sendText") == []


def test_media_that_times_out_is_unknown_not_resent(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    pdf = {"url": "https://example.com/menu.pdf", "mimetype": "application/pdf"}
    message_id = store.messages.collection.insert_one(message(now, media=pdf)).inserted_id
    waha.stall_after_send, waha.stall = {"447700900123@c.us"}, 1.5
    quick = WahaClient(settings.waha_url, settings.waha_api_key, 0.5)
    try:
        assert tick(store, quick, 20, now=now).unknown == 1
        assert tick(store, quick, 20, now=now + seconds(60)).claimed == 0
    finally:
        quick.close()
    doc = store.messages.collection.find_one({"_id": message_id})
    assert doc["status"] == "unknown" and "WAHA takes no message id for media" in doc["lastError"]
    assert len(waha.requests_to("/api/sendFile")) == 1


@pytest.mark.parametrize(
    ("media", "error"),
    [
        ("https://example.com/a.jpg", "media must be an object"),
        ({"url": "https://example.com/a.jpg"}, "media.mimetype None is not a MIME type"),
        ({"url": "ftp://example.com/a.jpg", "mimetype": "image/jpeg"}, "media.url 'ftp://"),
        ({"mimetype": "image/jpeg"}, "either a url or base64 data"),
        ({"url": "https://x.io/a", "data": "AAAA", "mimetype": "image/png"}, "exactly one"),
        ({"data": "not base64!", "mimetype": "image/png"}, "media.data is not base64"),
        ({"data": "AAAA", "mimetype": "image/png", "caption": 5}, "media.caption must be text"),
    ],
)
def test_malformed_media_fails_with_a_reason(
    store: Store, client: WahaClient, waha: WahaSimulator, media: Any, error: str
) -> None:
    now = utcnow()
    message_id = store.messages.collection.insert_one(message(now, media=media)).inserted_id
    assert tick(store, client, 20, now=now).failed == 1
    doc = store.messages.collection.find_one({"_id": message_id})
    assert doc["status"] == "failed" and error in doc["lastError"]
    assert waha.message_requests() == []
