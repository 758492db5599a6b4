"""Helpers the tests share: a millisecond clock, message documents as the web app writes them,
waiting on progress, and the scan of log lines for secrets."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from poller.events import EVENTS_PATH, Receiver
from poller.metrics import Metrics
from poller.settings import Settings
from poller.testing.mongo import free_port

# Values no log line may ever show: each test's output, and the stderr of every process it
# starts, is scanned for them (conftest.py).
API_KEY = "test-key-9f8e7d6c"
MONGODB_PASSWORD = "pw-Zq81xLm"
WRONG_KEY = "wrong-key-77x"
WEBHOOK_KEY = "hmac-key-5e1c0a"
# The secret in the webhook URL's path and the X-Poller-Secret header (tests/test_webhooks.py).
WEBHOOK_SECRET = "hook-secret-8b2d4f"
# The keys of three WAHA servers (tests/test_servers.py).
SERVER_KEYS = ["key-a-1c2d3e", "key-b-4f5a6b", "key-c-7c8d9e"]
# The dashboard's secret (tests/test_dashboard.py).
DASHBOARD_TOKEN = "dashboard-token-3f9a1b7c5d"
SECRETS = [
    API_KEY,
    MONGODB_PASSWORD,
    WRONG_KEY,
    "wrong-key",
    WEBHOOK_KEY,
    WEBHOOK_SECRET,
    *SERVER_KEYS,
    DASHBOARD_TOKEN,
]

# The poller command, as the tests start it.
POLLER = [sys.executable, "-m", "poller"]

# WAHA's published OpenAPI description: WAHA_OPENAPI, or ../shared/waha/openapi.json beside the
# repository (every WAHA server serves its own at GET /-json). The tests that check requests and
# answers against it skip without it, all with this reason (conftest.py counts them).
SPEC = Path(
    os.environ.get("WAHA_OPENAPI", Path(__file__).resolve().parents[2] / "shared/waha/openapi.json")
)
NO_SPEC = f"WAHA's published spec is not at {SPEC}"


def suite_secrets() -> list[str]:
    """SECRETS, and the password of MONGODB_TEST_URI when the suite runs against a real mongod."""
    uri = os.environ.get("MONGODB_TEST_URI", "")
    return SECRETS + (Settings(mongodb_uri=uri, mongodb_db="x").secrets if uri else [])


def leaked_lines(text: str, secrets: Iterable[str]) -> list[str]:
    """The lines of `text` that show one of `secrets`."""
    wanted = [s for s in secrets if s]
    return [line for line in text.splitlines() if any(s in line for s in wanted)]


def child_logs(folder: Path) -> str:
    """What the Python processes started with POLLER_TEST_LOGS=`folder` wrote to stderr (see
    capture/sitecustomize.py)."""
    return "".join(f.read_text(errors="replace") for f in sorted(folder.glob("*.log")))


def wait_until(done: Callable[[], object], limit: float = 60, what: str = "") -> None:
    """Poll `done` until it is true; fail after `limit` seconds. Limits are generous: a busy
    machine makes progress slower, never different."""
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, f"timed out after {limit:g} s: {what or done}"
        time.sleep(0.05)


def utcnow() -> datetime:
    """Now, to the millisecond: MongoDB keeps dates in milliseconds."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def message(
    scheduled_at: datetime,
    chat_id: str = "447700900123@c.us",
    content: str = "Hello",
    session: str | None = "default",
    **fields: Any,
) -> dict[str, Any]:
    """A message document as the web app writes it."""
    doc: dict[str, Any] = {
        "scheduledAt": scheduled_at,
        "chatId": chat_id,
        "content": content,
        "isSent": False,
        "isPicked": False,
        "isDeleted": False,
    }
    if session is not None:
        doc["session"] = session
    doc.update(fields)
    return doc


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment with the poller settings of `settings` (and `extra`) only."""
    prefixes = ("MONGODB", "WAHA", "LOG", "PACING", "TYPING", "DAILY_CAP", "QUIET", "TIMEZONE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        MONGODB_URI=settings.mongodb_uri,
        MONGODB_DB=settings.mongodb_db,
        WAHA_URL=settings.waha_url,
        WAHA_API_KEY=settings.waha_api_key,
        # Generous: on a busy machine an answer is slow, not missing. A test of an unreachable
        # MongoDB sets a short one.
        MONGODB_TIMEOUT_SECONDS="30",
        WAHA_TIMEOUT_SECONDS="10",
        PACING_MIN_SECONDS=str(settings.pacing_min_seconds),
        PACING_MAX_SECONDS=str(settings.pacing_max_seconds),
    )
    env.update(extra)
    return env


@contextmanager
def replicas(envs: list[dict[str, str]], folder: Path) -> Iterator[list[int | None]]:
    """A `poller run` process per environment, each logging to `folder`/replica-<k>.log;
    SIGTERM at the end of the block. Yields their exit codes, filled in once they stopped."""
    codes: list[int | None] = [None] * len(envs)
    logs = [(folder / f"replica-{k}.log").open("w") for k in range(len(envs))]
    started = [
        subprocess.Popen([*POLLER, "run"], env=env, cwd=folder, stderr=log)
        for env, log in zip(envs, logs, strict=True)
    ]
    try:
        yield codes
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        codes[:] = [process.wait(timeout=60) for process in started]
        for log in logs:
            log.close()


def event_post(body: bytes, path: str = "/waha/events", **headers: str) -> dict[str, Any]:
    """The WSGI environ of a post of `body` to `path` (a Receiver's `handle` takes it)."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "REMOTE_ADDR": "127.0.0.1",
        **headers,
    }


@contextmanager
def serving_events(receiver: Receiver) -> Iterator[str]:
    """`receiver` behind the metrics server: the URL WAHA posts to (no secret in it)."""
    port = free_port()
    server = Metrics().serve("127.0.0.1", port, lambda: True, receiver)
    try:
        yield f"http://127.0.0.1:{port}{EVENTS_PATH}"
    finally:
        server.shutdown()
