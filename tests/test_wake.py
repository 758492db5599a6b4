"""Sending on time: `poller run` ticks when a message comes due, not only on its timer, and a
message the web app writes between two ticks wakes it (through a change stream, where MongoDB
offers one; without one, the next tick sees it)."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic, sleep
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from support import POLLER, environment, message, seconds, utcnow, wait_until

from poller.daemon import Wakeup, add_jobs
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import MongoDaemon
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient
from poller.watch import Watcher

# Far longer than any test waits: a message sent in time was sent because poller woke for it.
TIMER = "600"


@pytest.fixture
def client(settings: Settings) -> Iterator[WahaClient]:
    waha = WahaClient(settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds)
    yield waha
    waha.close()


def chat(n: int) -> str:
    return f"4477{n:08d}@c.us"


def test_a_tick_says_when_the_next_message_comes_due(store: Store, client: WahaClient) -> None:
    now = utcnow()
    unpicked = message(now + seconds(12), chat_id=chat(3))
    del unpicked["isPicked"]  # the web app may leave it out
    store.messages.collection.insert_many(
        [
            message(now, chat_id=chat(0)),
            message(now + seconds(5), chat_id=chat(1), isDeleted=True),
            message(now + seconds(8), chat_id=chat(2), isSent=True),
            unpicked,
            message(now + seconds(20), chat_id=chat(4)),
            message(now + seconds(45), chat_id=chat(5)),  # after the next regular tick
        ]
    )
    wakes = []
    at: datetime | None = now
    while at is not None:
        counts = tick(store, client, 20, now=at)
        wakes.append((counts.sent, counts.next_at))
        at = counts.next_at
    # A deleted or already sent message costs no tick: it leaves the queue once read.
    assert wakes == [
        (1, now + seconds(12)),
        (1, now + seconds(20)),
        (1, now + seconds(45)),  # within 30 s of the tick at +20 s
        (1, None),
    ]


def test_a_message_planned_for_later_is_due_then(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    """A paced session's second message is planned 7 s after the first; a third one, scheduled
    at 12 s, comes due then: `poller run` wakes for each."""
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=chat(0)), message(now, chat_id=chat(1))]
    )
    store.messages.collection.insert_one(message(now + seconds(12), chat_id=chat(2), session="s2"))
    first = tick(store, client, 20, now=now, pacing=Pacing(7, 7))
    assert (first.sent, first.next_at) == (1, now + seconds(7))
    second = tick(store, client, 20, now=now + seconds(7), pacing=Pacing(7, 7))
    assert (second.sent, second.next_at) == (1, now + seconds(12))


def test_wakeup_brings_the_tick_forward_and_never_moves_it_while_it_runs() -> None:
    scheduler = BackgroundScheduler(timezone=UTC)
    later = utcnow() + seconds(600)
    scheduler.add_job(lambda: None, "interval", id="tick", seconds=600, next_run_time=later)
    wakeup = Wakeup(scheduler, "tick")

    def next_run() -> datetime:
        job = scheduler.get_job("tick")
        assert job is not None and job.next_run_time is not None
        return job.next_run_time  # type: ignore[no-any-return]

    soon = utcnow() + seconds(60)
    wakeup.ask(soon)
    assert next_run() == soon
    wakeup.ask(soon + seconds(30))
    assert next_run() == soon, "an earlier tick stays"

    asked_meanwhile = utcnow() + seconds(40)

    def work() -> datetime:
        wakeup.ask(asked_meanwhile)  # the watcher, while this tick runs
        assert next_run() == soon, "not moved while a tick runs"
        return utcnow() + seconds(50)  # the tick's own next message

    wakeup.run(work)
    assert next_run() == soon, "not moved before the scheduler reports the run over"
    wakeup.finished(JobExecutionEvent(EVENT_JOB_EXECUTED, "tick", "default", utcnow()))
    assert next_run() == asked_meanwhile, "what was asked during the tick is kept"

    wakeup.close()
    wakeup.ask(utcnow() + seconds(1))
    assert next_run() == asked_meanwhile, "closed: nothing moves the tick any more"


def test_a_tick_that_returns_slowly_still_gets_the_tick_it_asked_for() -> None:
    """On a busy machine the job can return well after the tick asked for the next one: the
    scheduler would skip a run moved to before that return. The move waits for the return."""
    scheduler = BackgroundScheduler(timezone=UTC)
    wakeup = Wakeup(scheduler, "tick")
    runs: list[datetime] = []

    def job() -> None:
        wakeup.run(lambda: runs.append(utcnow()) or utcnow())  # due again at once
        sleep(0.5)  # the thread is slow to return: the move must not come due before this ends

    scheduler.add_job(job, "interval", id="tick", seconds=3600, next_run_time=utcnow())
    scheduler.start()
    try:
        wait_until(lambda: len(runs) >= 3, 60, "ticks brought forward, not skipped")
    finally:
        wakeup.close()
        scheduler.shutdown(wait=True)


def test_a_wake_up_that_lands_as_a_tick_starts_is_not_lost() -> None:
    """The watcher rings after the scheduler started the tick's run but before that run began
    (the race of a job's submission): the tick it asks for still comes, after the running one,
    however long that takes. Before, the scheduler skipped it (one instance at a time), and the
    next tick came only at the timer."""
    scheduler = BackgroundScheduler(timezone=UTC)
    wakeup = Wakeup(scheduler, "tick")
    runs: list[float] = []
    first_done = threading.Event()
    run = wakeup.run

    def ring_then_run(work: Callable[[], datetime | None]) -> None:
        if not runs:
            wakeup.ask(utcnow())  # the watcher, just before the run begins
        run(work)

    def tick() -> datetime | None:
        runs.append(monotonic())
        if len(runs) == 1:  # a tick that takes a while: the asked-for one comes meanwhile
            first_done.wait(1.0)
        return None

    wakeup.run = ring_then_run  # type: ignore[method-assign]
    add_jobs(scheduler, wakeup, tick, lambda: None, 3600, 3600)
    scheduler.start()
    try:
        wait_until(lambda: len(runs) >= 2, 60, "the tick the wake-up asked for")
    finally:
        first_done.set()
        wakeup.close()
        scheduler.shutdown(wait=True)


# -- poller run -----------------------------------------------------------------------------------


class PollerRun:
    """A `poller run` process whose timer never fires during the test."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.log_path = folder / "poller.log"
        env = environment(
            settings, POLL_INTERVAL_SECONDS=TIMER, HEARTBEAT_SECONDS="3600", LOG_LEVEL="DEBUG"
        )
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen([*POLLER, "run"], env=env, cwd=folder, stderr=log)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, done: Callable[[], bool], limit: float = 30) -> None:
        deadline = monotonic() + limit
        while not done():
            assert monotonic() < deadline, f"timed out; log:\n{self.log()}"
            assert self.process.poll() is None, f"poller exited; log:\n{self.log()}"
            sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0


@pytest.fixture
def poller_run(tmp_path: Path) -> Iterator[Callable[[Settings], PollerRun]]:
    started: list[PollerRun] = []

    def start(settings: Settings) -> PollerRun:
        started.append(PollerRun(settings, tmp_path))
        return started[-1]

    yield start
    for poller in started:
        if poller.process.poll() is None:
            poller.stop()


def sent_on_time(store: Store, waha: WahaSimulator, count: int) -> None:
    """`count` messages sent, none before its scheduled time."""
    docs = list(store.messages.collection.find({"status": "sent"}))
    assert len(docs) == len(waha.sent) == count
    for doc in docs:
        assert doc["sentAt"] >= doc["scheduledAt"]


def test_poller_run_ticks_when_a_message_comes_due(
    settings: Settings,
    store: Store,
    waha: WahaSimulator,
    poller_run: Callable[[Settings], PollerRun],
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now + seconds(4), chat_id=chat(0)), message(now + seconds(6), chat_id=chat(1))]
    )
    poller = poller_run(settings)
    poller.wait_for(lambda: len(waha.sent) == 2)
    poller.stop()
    sent_on_time(store, waha, 2)


def test_a_message_written_between_two_ticks_wakes_poller_run(
    settings: Settings,
    store: Store,
    waha: WahaSimulator,
    poller_run: Callable[[Settings], PollerRun],
) -> None:
    poller = poller_run(settings)
    poller.wait_for(lambda: "watching scheduledmessages" in poller.log())
    poller.wait_for(lambda: "tick: claimed=0" in poller.log())  # the first tick is over
    store.messages.collection.insert_one(message(utcnow() + seconds(2), chat_id=chat(0)))
    poller.wait_for(lambda: len(waha.sent) == 1)
    # Rescheduled from an hour ahead: only the change of its scheduledAt can wake the poller.
    later = store.messages.collection.insert_one(message(utcnow() + seconds(3600), chat_id=chat(1)))
    sleep(1)
    store.messages.collection.update_one(
        {"_id": later.inserted_id}, {"$set": {"scheduledAt": utcnow() + seconds(2)}}
    )
    poller.wait_for(lambda: len(waha.sent) == 2)
    poller.stop()
    sent_on_time(store, waha, 2)


def test_without_a_change_stream_poller_run_still_wakes_for_due_messages(
    daemon: MongoDaemon,
    on_daemon: tuple[Settings, Store],
    waha: WahaSimulator,
    poller_run: Callable[[Settings], PollerRun],
) -> None:
    settings, store = on_daemon
    store.messages.collection.insert_one(message(utcnow() + seconds(4), chat_id=chat(0)))
    # What a standalone mongod answers. No tick runs an aggregate here (no campaign, no pacing,
    # no metrics): the watcher's is the first.
    refusal = "The $changeStream stage is only supported on replica sets"
    daemon.fail(["aggregate"], 1, errorCode=40573, errmsg=refusal)
    poller = poller_run(settings)
    poller.wait_for(lambda: len(waha.sent) == 1)
    poller.stop()
    sent_on_time(store, waha, 1)
    assert "no change stream (error 40573: " in poller.log()


# -- the watcher ----------------------------------------------------------------------------------


class Alarm:
    """What the watcher rang for, in order."""

    def __init__(self) -> None:
        self.rings: queue.Queue[datetime] = queue.Queue()

    def ring(self, at: datetime) -> None:
        self.rings.put(at)

    def take(self, timeout: float) -> datetime | None:
        try:
            return self.rings.get(timeout=timeout)
        except queue.Empty:
            return None


def watch(store: Store) -> tuple[Watcher, Alarm, threading.Event]:
    alarm, stop = Alarm(), threading.Event()
    watcher = Watcher(store, alarm.ring, stop)
    watcher.start()
    assert watcher.watching.wait(10)
    assert alarm.take(1) is not None  # at once: a tick reads what was written before
    return watcher, alarm, stop


def waited_for(condition: Callable[[], bool], limit: float = 60) -> bool:
    """Whether `condition` holds within `limit` seconds."""
    deadline = monotonic() + limit
    while not condition():
        if monotonic() > deadline:
            return False
        sleep(0.1)
    return True


def rung_for(alarm: Alarm, at: datetime, limit: float = 60) -> bool:
    """Whether the alarm rings for `at` within `limit` seconds (other rings are skipped)."""
    deadline = monotonic() + limit
    while monotonic() < deadline:
        if alarm.take(0.2) == at:
            return True
    return False


def test_the_watcher_rings_for_new_and_rescheduled_messages_only(store: Store) -> None:
    watcher, alarm, stop = watch(store)
    try:
        now = utcnow()
        first = store.messages.collection.insert_one(message(now + seconds(60), chat_id=chat(0)))
        assert alarm.take(10) == now + seconds(60)
        store.messages.collection.update_one(
            {"_id": first.inserted_id}, {"$set": {"status": "claimed"}}
        )
        store.messages.collection.update_one(
            {"_id": first.inserted_id}, {"$set": {"heldUntil": now}}
        )
        assert alarm.take(1) is None  # the poller's own writes do not wake it
        store.messages.collection.update_one(
            {"_id": first.inserted_id}, {"$set": {"scheduledAt": now + seconds(9)}}
        )
        assert alarm.take(10) == now + seconds(9)
        store.messages.collection.insert_one({"chatId": chat(1), "content": "no date"})
        assert alarm.take(10) is not None  # now: a tick fails it at once, with a reason
    finally:
        stop.set()
        watcher.join(5)
    assert not watcher.is_alive()


@pytest.mark.timeout(300)  # a restart of SecantusDB, then the watcher's reconnection
def test_the_watcher_carries_on_after_a_mongodb_restart(
    daemon: MongoDaemon, on_daemon: tuple[Settings, Store]
) -> None:
    settings, store = on_daemon
    # Its reads give up after 5 s, not the suite's 30: it notices the outage that much sooner.
    watched = Store.connect(replace(settings, mongodb_timeout_seconds=5.0))
    watcher, alarm, stop = watch(watched)
    try:
        daemon.kill()
        assert waited_for(lambda: not watcher.watching.is_set())  # it saw the stream end
        daemon.start()
        assert waited_for(watcher.watching.is_set)  # and opened it again
        due: Any = utcnow() + seconds(30)
        store.messages.collection.insert_one(message(due, chat_id=chat(0)))
        assert rung_for(alarm, due)
        assert watcher.is_alive()
    finally:
        stop.set()
        watcher.join(5)
        watched.close()
