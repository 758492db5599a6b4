"""Several WAHA servers: three simulators, each with its own key and sessions, on a fake clock.

Everything is counted as WAHA sees it: what each simulator delivered, and through which session.
Every test ends with each message delivered at most once, and none through a server that does
not hold its session.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import pairwise
from typing import Any

import pytest
from prometheus_client import generate_latest
from support import API_KEY, SERVER_KEYS, WRONG_KEY, message, seconds, utcnow

from poller import status
from poller.breaker import Breakers
from poller.daemon import Poller
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.servers import LISTING_WAIT_SECONDS, Servers
from poller.settings import Settings, WahaServer
from poller.store import Store
from poller.testing.waha import Request, WahaSimulator
from poller.tick import TickCounts, tick

NAMES = ("a", "b", "c")


@pytest.fixture
def wahas(
    openapi_validator: Callable[[Request], str | None] | None,
) -> Iterator[dict[str, WahaSimulator]]:
    """Three WAHA servers: session s1 on a, s2 on b, s3 on c, each with a key of its own."""
    started = {
        name: WahaSimulator(
            api_key=key, sessions={f"s{n}": "WORKING"}, validator=openapi_validator
        ).start()
        for n, (name, key) in enumerate(zip(NAMES, SERVER_KEYS, strict=True), 1)
    }
    yield started
    for simulator in started.values():
        simulator.stop()
        assert simulator.violations == [], "requests that break WAHA's OpenAPI spec"


@pytest.fixture
def several(
    make_settings: Callable[..., Settings], wahas: dict[str, WahaSimulator]
) -> Callable[..., Settings]:
    """Settings for the three servers; `keys` replaces some servers' keys."""

    def make(keys: dict[str, str] | None = None, **overrides: Any) -> Settings:
        keys = {**dict(zip(NAMES, SERVER_KEYS, strict=True)), **(keys or {})}
        servers = tuple(
            WahaServer(n, wahas[n].url, keys[n], f"WAHA_{n.upper()}_API_KEY") for n in NAMES
        )
        return make_settings(waha_servers=servers, **overrides)

    return make


class Ticker:
    """One poller's servers and breakers, kept across ticks on a clock the test moves."""

    def __init__(self, store: Store, settings: Settings, batch: int = 20) -> None:
        self.store, self.batch = store, batch
        self.servers = Servers.from_settings(settings)
        self.breakers = Breakers(seconds(settings.retry_seconds))
        self.pacing = Pacing.from_settings(settings)

    def __call__(self, now: datetime) -> TickCounts:
        return tick(
            self.store,
            self.servers,
            self.batch,
            now=now,
            breakers=self.breakers,
            pacing=self.pacing,
        )


@pytest.fixture
def ticker(store: Store, several: Callable[..., Settings]) -> Iterator[Callable[..., Ticker]]:
    made: list[Ticker] = []

    def make(settings: Settings | None = None) -> Ticker:
        made.append(Ticker(store, settings or several()))
        return made[-1]

    yield make
    for one in made:
        one.servers.close()


def chat(n: int) -> str:
    return f"4477{n:08d}@c.us"


def schedule(store: Store, at: datetime, sessions: dict[str, range]) -> None:
    """One message per chat number in each session's range, due at `at`."""
    store.messages.collection.insert_many(
        [
            message(at, chat_id=chat(n), session=session, content=f"to {n}")
            for session, numbers in sessions.items()
            for n in numbers
        ]
    )


def delivered(wahas: dict[str, WahaSimulator]) -> dict[str, dict[str, list[str]]]:
    """Server -> session -> the chats it delivered to, in order; no chat twice anywhere."""
    everywhere = Counter(m.chat_id for w in wahas.values() for m in w.sent)
    assert [c for c, n in everywhere.items() if n > 1] == [], "delivered twice"
    found: dict[str, dict[str, list[str]]] = {}
    for name, simulator in wahas.items():
        for sent in simulator.sent:
            found.setdefault(name, {}).setdefault(sent.session, []).append(sent.chat_id)
    return found


def docs(store: Store, session: str) -> list[dict[str, Any]]:
    return list(store.messages.collection.find({"session": session}).sort("chatId", 1))


def test_each_session_is_sent_through_the_server_that_holds_it(
    store: Store, wahas: dict[str, WahaSimulator], ticker: Callable[..., Ticker]
) -> None:
    now = utcnow()
    schedule(store, now, {"s1": range(1, 3), "s2": range(3, 5), "s3": range(5, 7)})
    counts = ticker()(now)
    assert counts.sent == 6
    assert delivered(wahas) == {
        "a": {"s1": [chat(1), chat(2)]},
        "b": {"s2": [chat(3), chat(4)]},
        "c": {"s3": [chat(5), chat(6)]},
    }
    for n, name in enumerate(NAMES, 1):
        assert {d["wahaServer"] for d in docs(store, f"s{n}")} == {name}
        # Each server got its own key, and nothing else asked it to send for another session.
        keys = {r.headers.get("X-Api-Key") for r in wahas[name].requests}
        assert keys == {SERVER_KEYS[n - 1]}
    assert counts.by_server == {name: {"sent": 2} for name in NAMES}


def test_a_server_down_pauses_only_its_own_sessions(
    store: Store, wahas: dict[str, WahaSimulator], ticker: Callable[..., Ticker]
) -> None:
    poller, now = ticker(), utcnow()
    schedule(store, now, {"s1": [1], "s2": [2], "s3": [3]})
    assert poller(now).sent == 3
    port = int(wahas["c"].url.rsplit(":", 1)[1])
    wahas["c"].stop()  # mid-campaign: server c goes away

    later = now + seconds(60)
    schedule(store, later, {"s1": [4], "s2": [5], "s3": [6]})
    counts = poller(later)
    assert counts.sent == 2, "the sessions of a and b kept sending"
    [waiting] = [d for d in docs(store, "s3") if d["chatId"] == chat(6)]
    assert waiting["isSent"] is False and waiting.get("status") is None
    assert (
        "session 's3' was last seen on WAHA server 'c', which is not answering"
        in (waiting["lastError"])
    )
    assert "could not be reached" in waiting["lastError"]
    state = {s["name"]: s for s in counts.servers}
    assert state["c"]["reachable"] is False and state["c"]["breaker"] == "open"
    assert state["a"]["reachable"] is True and state["a"]["breaker"] == "closed"

    wahas["c"].start(port=port)  # back, after its breaker's cool-down
    counts = poller(later + seconds(40))
    assert counts.sent == 1
    assert delivered(wahas)["c"] == {"s3": [chat(3), chat(6)]}
    assert {d["status"] for d in store.messages.collection.find()} == {"sent"}


def test_a_slow_server_does_not_hold_up_the_others(
    store: Store, wahas: dict[str, WahaSimulator], ticker: Callable[..., Ticker]
) -> None:
    """A server that takes longer than LISTING_WAIT_SECONDS to list its sessions waits this
    tick out; the others send in it."""
    wahas["c"].listing_delay = LISTING_WAIT_SECONDS + 5
    now = utcnow()
    schedule(store, now, {"s1": [1], "s2": [2], "s3": [3]})
    counts = ticker()(now)
    assert counts.sent == 2
    assert set(delivered(wahas)) == {"a", "b"}
    [doc] = docs(store, "s3")
    assert doc["isSent"] is False
    assert (
        f"c: not known (WAHA did not list its sessions within {LISTING_WAIT_SECONDS:g} s)"
        in (doc["lastError"])
    )


def test_a_server_that_refuses_its_key_pauses_only_its_own_sessions(
    store: Store,
    wahas: dict[str, WahaSimulator],
    several: Callable[..., Settings],
    ticker: Callable[..., Ticker],
) -> None:
    now = utcnow()
    schedule(store, now, {"s1": [1], "s2": [2], "s3": [3]})
    counts = ticker(several(keys={"b": WRONG_KEY}))(now)
    assert counts.sent == 2 and counts.key_rejected is False
    assert set(delivered(wahas)) == {"a", "c"}
    assert [r.path for r in wahas["b"].requests] == ["/api/sessions"]
    [doc] = docs(store, "s2")
    assert doc["isSent"] is False and doc.get("status") is None
    assert "b: not known (WAHA rejected the API key (check WAHA_B_API_KEY))" in doc["lastError"]
    state = {s["name"]: s for s in counts.servers}
    assert state["b"]["keyAccepted"] is False and state["b"]["breaker"] == "open"
    assert status.describe(state["b"]).startswith("reachable, API key refused, breaker open")


def test_every_server_refusing_its_key_is_a_rejected_key(
    store: Store, several: Callable[..., Settings], ticker: Callable[..., Ticker]
) -> None:
    wrong = {name: WRONG_KEY for name in NAMES}
    assert ticker(several(keys=wrong))(utcnow()).key_rejected is True


def test_a_moved_session_continues_from_its_new_server_at_its_pace(
    store: Store,
    wahas: dict[str, WahaSimulator],
    several: Callable[..., Settings],
    ticker: Callable[..., Ticker],
) -> None:
    settings = several(pacing_min_seconds=10.0, pacing_max_seconds=10.0, daily_cap=3)
    poller, now = ticker(settings), utcnow()
    schedule(store, now, {"s1": range(1, 6)})
    at, sends = now, []
    for _ in range(12):  # a paced session sends one message a turn
        poller(at)
        if len(wahas["a"].sent) == 2 and "s1" in wahas["a"].sessions:
            del wahas["a"].sessions["s1"]  # moved: gone from a, WORKING on b
            wahas["b"].sessions["s1"] = "WORKING"
        at += seconds(5)
        sends = sorted(
            store.messages.collection.find({"status": "sent"}), key=lambda d: d["sentAt"]
        )
    # The order and the daily cap carried over: two through a, the third through b, then
    # the cap of 3 holds the rest until tomorrow.
    assert delivered(wahas) == {"a": {"s1": [chat(1), chat(2)]}, "b": {"s1": [chat(3)]}}
    assert [d["wahaServer"] for d in sends] == ["a", "a", "b"]
    gaps = [(b["sentAt"] - a["sentAt"]).total_seconds() for a, b in pairwise(sends)]
    assert min(gaps) >= 10, "the pace carried over"
    held = docs(store, "s1")[3:]
    assert all("daily cap" in d["lastError"] for d in held), held
    lane = store.turns.collection.find_one({"_id": "s1"})
    assert lane is not None and lane["count"] == 3


def test_a_session_on_two_servers_waits_until_it_is_on_one(
    store: Store, wahas: dict[str, WahaSimulator], ticker: Callable[..., Ticker]
) -> None:
    wahas["b"].sessions["s1"] = "WORKING"  # s1 on a and on b
    poller, now = ticker(), utcnow()
    schedule(store, now, {"s1": [1], "s2": [2]})
    assert poller(now).sent == 1
    [doc] = docs(store, "s1")
    assert doc["isSent"] is False and doc.get("status") is None
    assert "session 's1' is WORKING on two WAHA servers, a and b" in doc["lastError"]
    assert [m.session for w in wahas.values() for m in w.sent] == ["s2"]

    wahas["a"].sessions["s1"] = "STOPPED"  # logged out of a: b holds it alone
    assert poller(now + seconds(5)).sent == 1
    assert delivered(wahas)["b"] == {"s2": [chat(2)], "s1": [chat(1)]}


@pytest.mark.parametrize("moved", [False, True])
def test_a_send_in_doubt_is_retried_only_through_the_same_server(
    store: Store,
    wahas: dict[str, WahaSimulator],
    several: Callable[..., Settings],
    ticker: Callable[..., Ticker],
    moved: bool,
) -> None:
    # The send is delivered, but its answer comes after WAHA's timeout.
    wahas["a"].stall_after_send.add(chat(1))
    wahas["a"].stall = 10.0
    poller, now = ticker(several(waha_timeout_seconds=5.0)), utcnow()
    schedule(store, now, {"s1": [1]})
    assert poller(now).retried == 1
    [doc] = docs(store, "s1")
    assert doc["inDoubt"] is True and doc["wahaServer"] == "a"
    if moved:
        del wahas["a"].sessions["s1"]
        wahas["b"].sessions["s1"] = "WORKING"
    counts = poller(now + seconds(60))
    [doc] = docs(store, "s1")
    assert delivered(wahas) == {"a": {"s1": [chat(1)]}}, "delivered once, through a"
    if moved:
        assert counts.unknown == 1 and doc["status"] == "unknown"
        assert "through WAHA server 'a' may have reached WhatsApp" in doc["lastError"]
        assert "now on WAHA server 'b'" in doc["lastError"]
        assert {r.path for r in wahas["b"].requests} == {"/api/sessions"}
    else:  # the same id again: WAHA answers with the message it already sent
        assert counts.sent == 1 and doc["status"] == "sent"


def test_a_message_in_doubt_from_before_several_servers_is_not_resent(
    store: Store,
    wahas: dict[str, WahaSimulator],
    several: Callable[..., Settings],
    ticker: Callable[..., Ticker],
) -> None:
    """Written by a poller of one server (no `wahaServer`): which server it went through is
    not known, so with several it ends unknown rather than risk a second delivery."""
    now = utcnow()
    store.messages.collection.insert_one(
        message(now, chat_id=chat(1), session="s1", inDoubt=True, sendId="ABC", attempts=1)
    )
    assert ticker()(now).unknown == 1
    assert delivered(wahas) == {}


def test_heartbeat_status_check_and_metrics_show_each_server(
    store: Store,
    wahas: dict[str, WahaSimulator],
    several: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = several(keys={"b": WRONG_KEY})
    wahas["c"].stop()
    schedule(store, utcnow(), {"s1": [1]})
    poller = Poller(settings)
    try:
        poller.start()
        counts = poller.tick()
        poller.heartbeat()
    finally:
        poller.close()
    beat = store.heartbeats.live(utcnow())[0]
    servers = {s["name"]: s for s in beat["wahaServers"]}
    assert servers["a"] == {
        "name": "a",
        "url": wahas["a"].url,
        "reachable": True,
        "keyAccepted": True,
        "breaker": "closed",
        "problem": None,
        "sessions": [{"name": "s1", "status": "WORKING"}],
    }
    assert servers["b"]["keyAccepted"] is False and servers["b"]["sessions"] is None
    assert servers["c"]["reachable"] is False and servers["c"]["breaker"] == "open"
    assert beat["wahaSessions"] == [{"name": "s1", "status": "WORKING"}]

    assert status.check(settings) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        f"  WAHA server a at {wahas['a'].url}: reachable, key accepted, breaker closed; "
        + ("sessions: s1 WORKING")
        in lines
    )
    assert any(line.startswith("  WAHA server c at") and "unreachable" in line for line in lines)
    assert status.status(settings, as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)["servers"]
    assert [s["name"] for s in shown] == ["a", "b", "c"]
    assert shown[1]["state"].startswith("reachable, API key refused, breaker open")
    assert status.status(settings) == 0
    table = capsys.readouterr().out
    assert "WAHA servers" in table and "API key refused" in table
    for secret in (*SERVER_KEYS, WRONG_KEY, API_KEY):
        assert secret not in table + json.dumps(shown)

    metrics = Metrics()
    metrics.record(counts, 0.1, 0)
    text = generate_latest(metrics.registry).decode()
    assert 'poller_waha_sends_total{outcome="sent",server="a"} 1.0' in text
    assert 'poller_waha_up{server="a"} 1.0' in text
    assert 'poller_waha_up{server="c"} 0.0' in text
    assert 'poller_waha_breaker_open{server="b"} 1.0' in text
    assert 'poller_waha_sessions_working{server="a"} 1.0' in text


def test_servers_from_the_environment() -> None:
    env = {
        "MONGODB_URI": "mongodb://h/db",
        "WAHA_API_KEY": "shared",
        "WAHA_SERVERS": " eu-1 , us2 ",
        "WAHA_EU_1_URL": "http://10.0.0.5:3000/",
        "WAHA_EU_1_API_KEY": "own-key",
        "WAHA_US2_URL": "https://waha.example.com",
    }
    settings = Settings.from_env(env)
    assert settings.servers == (
        WahaServer("eu-1", "http://10.0.0.5:3000", "own-key", "WAHA_EU_1_API_KEY", "WAHA_EU_1_URL"),
        WahaServer("us2", "https://waha.example.com", "shared", "WAHA_API_KEY", "WAHA_US2_URL"),
    )
    assert {"own-key", "shared"} <= set(settings.secrets)
    # One server, as before there were several.
    one = Settings.from_env({"MONGODB_URI": "mongodb://h/db", "WAHA_URL": "http://w:1"})
    assert one.servers == (WahaServer("default", "http://w:1", ""),)
