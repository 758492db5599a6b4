"""Faults: WAHA down, slow or failing; MongoDB failing or restarted.

Every test ends with the same check: each message is final, and WAHA delivered each at most
once (each test message has a chat of its own, so a duplicate shows as a second delivery).
Replicas killed mid-work are the soak's (benchmarks/soak.py, a release check); on a fake clock,
tests/test_tick.py takes over a dead poller's claims and resends its send in flight.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support import POLLER, environment, message, seconds, utcnow, wait_until

from poller.breaker import Breakers
from poller.contract import FINAL
from poller.servers import server_key
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import MongoDaemon, mongo_daemon
from poller.testing.waha import WahaSimulator
from poller.tick import TickCounts, tick
from poller.waha import WahaClient


def chat(n: int) -> str:
    return f"4477{n:08d}@c.us"


def delivered_at_most_once(waha: WahaSimulator) -> Counter[str]:
    per_chat = Counter(m.chat_id for m in waha.sent)
    assert [c for c, n in per_chat.items() if n > 1] == [], "delivered twice"
    return per_chat


def check_final(store: Store, waha: WahaSimulator, total: int) -> Counter[str]:
    """Every message final, each sent one delivered once, every other with a reason."""
    per_chat = delivered_at_most_once(waha)
    docs = list(store.messages.collection.find())
    assert len(docs) == total
    for doc in docs:
        assert doc.get("status") in FINAL, doc
        if doc["status"] == "sent":
            assert per_chat[doc["chatId"]] == 1, doc
        else:
            assert isinstance(doc.get("lastError"), str) and doc["lastError"], doc
    return Counter(d["status"] for d in docs)


class Ticker:
    """One poller process's collaborators, kept across ticks, with a clock the test moves.
    `timeout`: WAHA's; long enough by default that no answer times out on a busy machine."""

    def __init__(self, store: Store, settings: Settings, timeout: float = 30.0) -> None:
        self.store, self.settings = store, settings
        self.waha = WahaClient(settings.waha_url, settings.waha_api_key, timeout)
        self.breakers = Breakers(seconds(settings.retry_seconds))

    def __call__(self, now: datetime) -> TickCounts:
        return tick(self.store, self.waha, 5, now=now, breakers=self.breakers)


@pytest.fixture
def make_ticker(store: Store, settings: Settings) -> Iterator[Callable[..., Ticker]]:
    made: list[Ticker] = []

    def make(**kwargs: float) -> Ticker:
        made.append(Ticker(store, settings, **kwargs))
        return made[-1]

    yield make
    for ticker in made:
        ticker.waha.close()


@pytest.fixture
def ticker(make_ticker: Callable[..., Ticker]) -> Ticker:
    return make_ticker()


# -- WAHA -----------------------------------------------------------------------------------------


def test_waha_down_for_a_while_then_back(store: Store, waha: WahaSimulator, ticker: Ticker) -> None:
    port = int(waha.url.rsplit(":", 1)[1])
    now = utcnow()
    store.messages.collection.insert_many([message(now, chat_id=chat(n)) for n in range(6)])
    waha.stop()

    assert ticker(now).claimed == 0
    assert server_key("default") in ticker.breakers.open(now), (
        "opens at once: the server is unreachable"
    )
    assert ticker(now + seconds(10)).claimed == 0, "open: WAHA is not even asked"
    waha.start(port)
    assert ticker(now + seconds(20)).claimed == 0, "still cooling down"
    assert waha.requests == []
    counts = ticker(now + seconds(31))  # half-open: the session listing is the probe
    assert counts.sent == 6
    assert check_final(store, waha, 6) == {"sent": 6}


def test_slow_answers_open_the_session_breaker_and_never_deliver_twice(
    store: Store, waha: WahaSimulator, make_ticker: Callable[..., Ticker]
) -> None:
    # A 3 s timeout: the other session's answers come well within it, however busy the machine.
    ticker = make_ticker(timeout=3.0)
    waha.sessions["other"] = "WORKING"
    waha.slow_sessions["default"] = 10.0  # past the timeout: delivered, answered too late
    now = utcnow()
    store.messages.collection.insert_many([message(now, chat_id=chat(n)) for n in range(5)])
    store.messages.collection.insert_many(
        [message(now, chat_id=chat(n), session="other") for n in (5, 6)]
    )

    counts = ticker(now)
    assert counts.sent == 2, "the other session goes on"
    assert len(waha.requests_to("/api/sendText")) == 5, "3 timeouts open the breaker"
    assert "default" in ticker.breakers.open(now)
    # The three timed out wait to be retried; the two not yet claimed are not claimed while
    # the breaker is open (one round holds both sessions' messages, in turn).
    assert counts.retried == 3 and counts.claimed == 5
    waiting = store.messages.collection.count_documents(
        {"session": "default", "status": {"$in": ["retry", "pending", None]}, "isPicked": False}
    )
    assert waiting == 5

    waha.slow_sessions.clear()  # WAHA is quick again
    counts = ticker(now + seconds(31))
    assert counts.sent == 5
    assert check_final(store, waha, 7) == {"sent": 7}
    assert len(waha.sent) == 7, "the three timed-out sends went again under their ids"


def test_one_failure_in_half_open_reopens_and_one_success_closes() -> None:
    now = utcnow()
    breakers = Breakers(seconds(30))
    assert not breakers.failed("default", now, "500") and not breakers.failed("default", now, "x")
    breakers.succeeded("default")
    assert not breakers.failed("default", now, "after a success the count starts again")
    assert not breakers.failed("default", now, "2")
    assert breakers.failed("default", now, "3: open")
    assert breakers.open(now + seconds(29)) == {"default": "3: open"}
    half_open = now + seconds(31)
    assert breakers.open(half_open) == {}
    assert breakers.failed("default", half_open, "one failure reopens it")
    assert "default" in breakers.open(half_open + seconds(1))
    breakers.succeeded("default")
    assert breakers.open(half_open + seconds(1)) == {}


def test_random_engine_errors_fail_their_messages_and_the_rest_go_out(
    store: Store, waha: WahaSimulator, ticker: Ticker
) -> None:
    waha.sessions = {"s1": "WORKING", "s2": "WORKING", "s3": "WORKING"}
    waha.error_rate = 0.1  # drawn from a generator seeded at 0: the same faults every run
    now = utcnow()
    total = 60
    store.messages.collection.insert_many(
        [message(now, chat_id=chat(n), session=f"s{n % 3 + 1}") for n in range(total)]
    )
    for step in range(0, 240, 31):  # until every breaker has closed again
        ticker(now + seconds(step))
        if store.messages.collection.count_documents({"status": {"$nin": list(FINAL)}}) == 0:
            break
    outcomes = check_final(store, waha, total)
    assert outcomes["sent"] >= total * 0.75 and outcomes["failed"] >= 1
    assert set(outcomes) <= {"sent", "failed"}
    requests = Counter(r.json()["chatId"] for r in waha.requests_to("/api/sendText"))
    for doc in store.messages.collection.find({"status": "failed"}):
        assert "WAHA failed while sending (500" in doc["lastError"]
        assert requests[doc["chatId"]] == 1, "a 500 is never sent again"


# -- MongoDB --------------------------------------------------------------------------------------


def start_pollers(
    settings: Settings, n: int, folder: Path, **extra: str
) -> list[subprocess.Popen[Any]]:
    env = environment(
        settings,
        POLL_INTERVAL_SECONDS="1",
        LEASE_SECONDS="3",
        RETRY_SECONDS="1",
        # However slow the machine, no message may expire while a test runs.
        LOOKBACK_SECONDS="3600",
        WAHA_TIMEOUT_SECONDS="2",
        MONGODB_TIMEOUT_SECONDS="2",
        **extra,
    )
    processes = []
    for i in range(n):
        with (folder / f"poller-{i}.log").open("w") as log:
            processes.append(subprocess.Popen(POLLER + ["run"], env=env, stderr=log, cwd=folder))

    # Each one past its start-up (which exits 1 when MongoDB is unreachable, by design) before
    # the test breaks anything: on a busy machine one can start long after the other sends.
    def exited() -> bool:
        return any(p.poll() is not None for p in processes)

    wait_until(lambda: started(folder) == n or exited(), 120, "every poller started")
    assert not exited(), logs(folder)[-3000:]
    return processes


def started(folder: Path) -> int:
    return sum("running: a tick every" in log.read_text() for log in folder.glob("poller-*.log"))


def stop_pollers(processes: list[subprocess.Popen[Any]]) -> list[int | None]:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    return [process.wait(timeout=60) for process in processes]


def logs(folder: Path) -> str:
    return "".join(log.read_text() for log in sorted(folder.glob("poller-*.log")))


def settled(store: Store) -> Callable[[], bool]:
    return lambda: store.messages.collection.count_documents({"status": {"$nin": list(FINAL)}}) == 0


@pytest.mark.timeout(300)  # poller processes and SecantusDB on a busy machine
def test_failing_mongodb_commands_lose_nothing_and_send_nothing_twice(
    daemon: MongoDaemon, on_daemon: tuple[Settings, Store], waha: WahaSimulator, tmp_path: Path
) -> None:
    settings, store = on_daemon
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now + seconds(2), chat_id=chat(n)) for n in range(24)]
    )
    # Non-retryable failures of writes and reads, and dropped connections, as the ticks start.
    daemon.fail(["update", "find"], 4, errorCode=2, errmsg="injected")
    [poller] = start_pollers(settings, 1, tmp_path, HEARTBEAT_SECONDS="3600")
    try:
        wait_until(lambda: len(waha.sent) >= 8, 60)
        daemon.fail(["update"], 3, closeConnection=True)  # retried by the driver
        wait_until(lambda: len(waha.sent) >= 16, 60)
        daemon.fail(["update", "find"], 5, errorCode=2)
        wait_until(settled(store), 90)
        assert poller.poll() is None, logs(tmp_path)[-3000:]
    finally:
        assert stop_pollers([poller]) == [0], logs(tmp_path)[-3000:]
    assert check_final(store, waha, 24) == {"sent": 24}
    log = (tmp_path / "poller-0.log").read_text()
    assert "tick skipped, MongoDB is unavailable" in log and log.rstrip().endswith("stopped")


@pytest.mark.timeout(300)  # poller processes and SecantusDB on a busy machine
def test_mongodb_restart_loses_nothing_and_sends_nothing_twice(
    daemon: MongoDaemon, on_daemon: tuple[Settings, Store], waha: WahaSimulator, tmp_path: Path
) -> None:
    settings, store = on_daemon
    now = utcnow()
    waha.latency = 0.05
    store.messages.collection.insert_many(
        [message(now + seconds(1), chat_id=chat(n)) for n in range(20)]
    )
    processes = start_pollers(settings, 2, tmp_path)
    try:
        wait_until(lambda: len(waha.sent) >= 8, 60)
        down = logs(tmp_path).count("MongoDB is unavailable")
        daemon.kill()  # a crash: only what it acknowledged survives
        wait_until(lambda: logs(tmp_path).count("MongoDB is unavailable") > down, 60, "seen down")
        daemon.start()
        wait_until(settled(store), 90)
        assert [p.poll() for p in processes] == [None, None], logs(tmp_path)[-3000:]
    finally:
        assert stop_pollers(processes) == [0, 0], logs(tmp_path)[-3000:]
    outcomes = check_final(store, waha, 20)
    # A send whose outcome could not be written is in doubt; under its message id it is sent
    # again and WAHA answers with the same message.
    assert outcomes == {"sent": 20}, outcomes


# -- TLS ------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_a_tls_uri_works(
    make_settings: Callable[..., Settings], waha: WahaSimulator, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with mongo_daemon(tls=(cert, key)) as daemon:
        assert "tls=true" in daemon.uri
        settings = make_settings(mongodb_uri=daemon.uri)
        store = Store.connect(settings)
        store.messages.collection.insert_one(message(utcnow(), chat_id=chat(1)))
        result = subprocess.run(
            POLLER + ["once"],
            env=environment(settings),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "sent=1" in result.stderr and len(waha.sent) == 1
        store.close()


def test_a_hiccup_in_the_session_listing_does_not_stop_sending(
    store: Store, waha: WahaSimulator, ticker: Ticker
) -> None:
    waha.listing_fails = 1
    now = utcnow()
    store.messages.collection.insert_one(message(now, chat_id=chat(1)))
    assert ticker(now).sent == 1
    assert ticker.breakers.open(now) == {}


def test_writes_need_a_majority_unless_the_uri_says_otherwise(
    make_settings: Callable[..., Settings], mongo_uri: str
) -> None:
    with_w = f"{mongo_uri}&w=1" if "?" in mongo_uri else f"{mongo_uri.rstrip('/')}/?w=1"
    for uri, expected in ((mongo_uri, {"w": "majority"}), (with_w, {"w": 1})):
        store = Store.connect(make_settings(mongodb_uri=uri))
        assert store.client.write_concern.document == expected
        store.close()
