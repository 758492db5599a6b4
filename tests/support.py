"""Helpers the tests share: a millisecond clock and message documents as the web app writes them."""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from poller.settings import Settings

# Values no log line may ever show: the suite checks the logs of every poller run for them.
API_KEY = "test-key-9f8e7d6c"
MONGODB_PASSWORD = "pw-Zq81xLm"
WRONG_KEY = "wrong-key-77x"
SECRETS = [API_KEY, MONGODB_PASSWORD, WRONG_KEY, "wrong-key"]
# Processes the tests start copy their stderr into this folder (see capture/sitecustomize.py);
# the output of each test's own process (pollers run in-process) is kept in the list.
SUITE_LOGS = (Path(tempfile.mkdtemp(prefix="poller-test-logs-")), list[str]())

# The poller command, as the tests start it.
POLLER = [sys.executable, "-m", "poller"]


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
        MONGODB_TIMEOUT_SECONDS="2",
        WAHA_TIMEOUT_SECONDS="10",
        PACING_MIN_SECONDS=str(settings.pacing_min_seconds),
        PACING_MAX_SECONDS=str(settings.pacing_max_seconds),
    )
    env.update(extra)
    return env
