"""The HTTP server of HEALTH_PORT (poller/web.py) against clients that hold on: slow-loris
sockets use no threads and are closed in time, oversized requests are refused before they are
read, and the dashboard's log-in refuses a flood of wrong tokens (throttle.py)."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from loguru import logger
from support import (
    DASHBOARD_TOKEN,
    POLLER,
    WRONG_KEY,
    environment,
    message,
    utcnow,
    wait_until,
)

from poller import web
from poller.dashboard import Dashboard
from poller.dashboard import throttle as throttle_module
from poller.dashboard.throttle import Throttle
from poller.events import EVENTS_PATH, Receiver
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import free_port
from poller.testing.waha import WahaSimulator

# A request that never ends: no blank line after its headers.
PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: poller\r\nX-Slow: "
# The dripping clients send one more byte this often: far more often than the idle timeout.
DRIP_SECONDS = 0.25
# Threads the server may add to the process, with room for the odd thread of a library.
THREAD_ROOM = 10


class Loris:
    """`n` slow clients of 127.0.0.1:`port`: half send the start of a request and fall silent,
    half send it and then one byte every DRIP_SECONDS. `step()` drips and notes which the
    server has closed."""

    def __init__(self, port: int, n: int) -> None:
        self.silent = [self._open(port) for _ in range(n // 2)]
        self.dripping = [self._open(port) for _ in range(n - n // 2)]
        self.closed: set[socket.socket] = set()
        self._dripped = time.monotonic()

    @staticmethod
    def _open(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(PARTIAL)
        return sock

    @property
    def open(self) -> list[socket.socket]:
        return [s for s in self.silent + self.dripping if s not in self.closed]

    def step(self) -> None:
        if time.monotonic() - self._dripped >= DRIP_SECONDS:
            self._dripped = time.monotonic()
            for sock in self.dripping:
                if sock not in self.closed:
                    try:
                        sock.send(b"a")
                    except OSError:
                        self.closed.add(sock)
        readable, _, _ = select.select(self.open, [], [], 0) if self.open else ([], [], [])
        for sock in readable:
            try:
                ended = sock.recv(4096) == b""
            except OSError:
                ended = True
            if ended:
                self.closed.add(sock)

    def close(self) -> None:
        for sock in self.silent + self.dripping:
            sock.close()


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timeouts of seconds, so that the test sees them enforced quickly."""
    monkeypatch.setattr(web, "IDLE_SECONDS", 2)
    monkeypatch.setattr(web, "REQUEST_SECONDS", 4)
    monkeypatch.setattr(web, "CLEANUP_SECONDS", 1)


def serve(
    receiver: Receiver | None = None, dashboard: Dashboard | None = None
) -> tuple[web.Server, int]:
    """The real server (Metrics.serve), always healthy, and its port."""
    port = free_port()
    return Metrics().serve("127.0.0.1", port, lambda: True, receiver, dashboard), port


# -- slow clients ---------------------------------------------------------------------------------


def test_a_slow_loris_holds_no_threads_and_is_closed_while_healthz_answers(
    short_timeouts: None,
) -> None:
    baseline = threading.active_count()
    server, port = serve()
    loris = Loris(port, 100)
    try:
        answers = 0
        deadline = time.monotonic() + 90  # generous: a busy machine is slow, never different
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while loris.open:
                assert time.monotonic() < deadline, f"{len(loris.open)} slow clients still open"
                loris.step()
                added = threading.active_count() - baseline
                assert added <= THREAD_ROOM, f"{added} threads for {len(loris.open)} slow clients"
                assert http.get("/healthz").status_code == 200
                answers += 1
                time.sleep(0.02)
    finally:
        loris.close()
        server.shutdown()
    assert answers >= 5, "/healthz was asked while the slow clients held their sockets"


def test_a_request_that_trickles_in_is_closed_at_its_deadline_though_never_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web, "IDLE_SECONDS", 600)  # only the request's deadline can close them
    monkeypatch.setattr(web, "REQUEST_SECONDS", 2)
    monkeypatch.setattr(web, "CLEANUP_SECONDS", 1)
    server, port = serve()
    loris = Loris(port, 10)
    loris.silent, loris.dripping = [], loris.silent + loris.dripping
    try:
        started = time.monotonic()

        def all_closed() -> bool:
            loris.step()
            return not loris.open

        wait_until(all_closed, 90, "the trickling requests closed")
        assert time.monotonic() - started >= 2 - 0.5, "closed before their deadline"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    finally:
        loris.close()
        server.shutdown()


def test_ticks_go_on_during_a_slow_loris_on_poller_runs_port(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    port = free_port()
    env = environment(settings, HEALTH_PORT=str(port), POLL_INTERVAL_SECONDS="0.5")
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(POLLER + ["run"], env=env, cwd=tmp_path, stderr=log)
    loris = None
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 120, "poller run serves")
        before = _threads(process.pid)
        loris = Loris(port, 100)
        store.messages.collection.insert_many(
            [message(utcnow(), chat_id=f"4477009000{n:02d}") for n in range(3)]
        )
        peak = 0

        def sent_all() -> bool:
            nonlocal peak
            assert loris is not None
            loris.step()
            peak = max(peak, _threads(process.pid))
            return len(waha.sent) == 3

        # The tick's send pool starts its threads while the slow clients hold their sockets.
        wait_until(sent_all, 120, "the messages sent during the slow loris")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        assert peak <= before + THREAD_ROOM, f"{peak - before} more threads in poller run"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, "a clean stop with the slow clients connected"
    finally:
        if loris is not None:
            loris.close()
        process.kill()
        log.close()


# -- oversized requests ---------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_from_its_content_length(store: Store) -> None:
    receiver = Receiver(
        store,
        hmac_key="key",
        secret="",
        max_bytes=1_000_000,
        optout_words=frozenset({"STOP"}),
        optin_words=frozenset({"START"}),
    )
    server, port = serve(receiver, Dashboard(store, Pacing(), DASHBOARD_TOKEN))
    base = f"http://127.0.0.1:{port}"
    try:
        # Headers only: the answer comes without any of the body being sent.
        assert _status(port, "POST /login", "Content-Length: 10000000") == 413
        assert _status(port, f"POST {EVENTS_PATH}", "Content-Length: 1000001") == 413
        # Up to the receiver's limit, a body reaches it (unsigned: refused by the receiver).
        events = httpx.post(f"{base}{EVENTS_PATH}", content=b"x" * 1_000_000, timeout=30)
        assert events.status_code == 401
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    finally:
        server.shutdown()


def test_oversized_headers_are_refused() -> None:
    server, port = serve()
    try:
        assert _status(port, "GET /healthz", "X-Big: " + "a" * (web.HEADER_BYTES + 1)) == 431
        assert _status(port, "GET /healthz", "X-Small: a") == 200
    finally:
        server.shutdown()


# -- log-in floods --------------------------------------------------------------------------------


@pytest.fixture
def dashboard(store: Store) -> Iterator[tuple[Dashboard, str, list[float]]]:
    """The dashboard served, its base URL, and the throttle's clock (seconds) to move."""
    now = [1000.0]
    served = Dashboard(store, Pacing(), DASHBOARD_TOKEN)
    served.auth.throttle = Throttle(clock=lambda: now[0])
    server, port = serve(None, served)
    yield served, f"http://127.0.0.1:{port}", now
    server.shutdown()


def client(base: str, address: str) -> httpx.Client:
    """A client connecting from `address` (any of 127.0.0.0/8 reaches 127.0.0.1)."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=base, transport=transport, follow_redirects=False, timeout=30)


def test_a_log_in_flood_is_refused_without_comparing_and_the_right_token_still_works(
    dashboard: tuple[Dashboard, str, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base, now = dashboard
    compared: list[str] = []
    matches = served.auth.matches

    def counted(given: str) -> bool:
        compared.append(given)
        return matches(given)

    monkeypatch.setattr(served.auth, "matches", counted)
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    limit = throttle_module.LIMIT
    wrong_bearer = {"Authorization": f"Bearer {WRONG_KEY}"}
    right_bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
    try:
        with client(base, "127.0.0.1") as form, client(base, "127.0.0.2") as script:
            for _ in range(limit):
                assert form.post("/login", data={"token": WRONG_KEY}).status_code == 401
                assert script.get("/api/status", headers=wrong_bearer).status_code == 401
            assert len(compared) == 2 * limit
            refused = form.post("/login", data={"token": DASHBOARD_TOKEN})
            assert refused.status_code == 429 and 'id="throttled"' in refused.text
            assert 1 <= int(refused.headers["Retry-After"]) <= throttle_module.WINDOW_SECONDS
            api = script.get("/api/status", headers=right_bearer)
            assert api.status_code == 429 and int(api.headers["Retry-After"]) >= 1
            assert len(compared) == 2 * limit, "a throttled client's token is not compared"

            # Another address logs in at once, by form and by bearer token.
            with client(base, "127.0.0.3") as other:
                assert other.post("/login", data={"token": DASHBOARD_TOKEN}).status_code == 303
                assert other.get("/api/status", headers=right_bearer).status_code == 200

            # Once the window has passed, so does the flooding address.
            now[0] += throttle_module.WINDOW_SECONDS
            assert form.post("/login", data={"token": DASHBOARD_TOKEN}).status_code == 303
            assert script.get("/api/status", headers=right_bearer).status_code == 200
    finally:
        logger.remove(sink)
    failed = [line for line in lines if "log-in" in line]
    assert failed == [
        "dashboard: failed log-in from 127.0.0.1\n",
        "dashboard: failed log-in from 127.0.0.2\n",
    ], "once per address per window"
    assert not any(WRONG_KEY in line for line in lines)


def test_the_throttle_remembers_a_bounded_number_of_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(throttle_module, "CAPACITY", 100)
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    for n in range(1000):  # a client choosing a new /64 for each try
        throttle.failed(f"2001:db8:{n:x}::1")
    assert len(throttle) == 100
    for n in range(1000):  # or a new address in its own /64: one client
        throttle.failed(f"2001:db8:ffff::{n:x}")
    assert throttle.retry_after("2001:db8:ffff::abcd") is not None
    now[0] += throttle_module.WINDOW_SECONDS
    assert throttle.retry_after("2001:db8:ffff::1") is None and len(throttle) == 0


def _status(port: int, request_line: str, header: str) -> int:
    """The status of the answer to a request of only a request line and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{request_line} HTTP/1.1\r\nHost: poller\r\n{header}\r\n\r\n".encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def _threads(pid: int) -> int:
    """The threads of process `pid` now (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])
