"""Helpers the tests share: a millisecond clock and message documents as the web app writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any


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
