"""Scheduling a message without writing MongoDB by hand: the document the web app would write
(see README, Data contract), checked field by field before anything is written. `poller send`,
the HTTP API (`POST /api/messages`) and the library call `poller.schedule` all go through here.

An error names the field: `to`, `text`, `at`, `session`, `priority` or `image`.
"""

from __future__ import annotations

import base64
import mimetypes
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bson import ObjectId

from poller.contract import CANCELLED, NOT_DONE, derived_id, normalise_chat_id
from poller.stats import Tally
from poller.store import Doc, Store
from poller.store.base import insert_once
from poller.store.messages import UNPICKED

# An image sent from a file is stored in the message (base64): MongoDB's 16 MB document limit.
MAX_IMAGE_BYTES = 10 * 1024 * 1024
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*$")
UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
CANCELLED_REASON = "Not sent: it was cancelled through poller's API."


class Invalid(ValueError):
    """What is wrong with what was asked, one line per problem, each naming its field (or, in
    a campaign, its row)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Request:
    """One message as a person or a script asks for it."""

    to: Any
    text: Any = None
    at: Any = None  # a datetime, an ISO 8601 text (local to `zone` without an offset), or None
    within: Any = None  # instead of `at`: "10m", "2h", "30s", "1d" from now
    session: Any = "default"
    priority: Any = None
    image: Any = None  # a file path or an http(s) URL


def when(at: Any, within: Any, now: datetime, zone: ZoneInfo) -> datetime | str:
    """The send time of `at` or `within` (now when neither), or why it is not one."""
    if at is not None and within is not None:
        return "at and in: give one of them, not both"
    if within is not None:
        match = DURATION.match(str(within))
        if match is None:
            return f"in: {within!r} is not a duration such as 30s, 10m, 2h or 1d"
        return now + timedelta(seconds=float(match[1]) * UNITS[match[2]])
    if at is None:
        return now
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at.strip().replace("Z", "+00:00"))
        except ValueError:
            return f"at: {at!r} is not a date and time such as 2026-12-24T09:00"
    if not isinstance(at, datetime):
        return f"at: {at!r} is not a date and time"
    return (at if at.tzinfo else at.replace(tzinfo=zone)).astimezone(UTC)


def document(
    request: Request,
    now: datetime,
    zone: ZoneInfo,
    lookback: timedelta,
    campaign_id: Any = None,
    files: bool = True,
) -> Doc:
    """The message document for `request`, as the data contract says the web app writes it;
    Invalid names every field that is wrong. `files`: whether `image` may be a local file
    (not over the API: a client must not read the server's files)."""
    problems = []
    chat_id = normalise_chat_id(request.to)
    if chat_id is None:
        problems.append(f"to: {request.to!r} is not a phone number or a WhatsApp chat id")
    media = _image(request.image, files) if request.image is not None else None
    if isinstance(media, str):
        problems.append(media)
    text = request.text if isinstance(request.text, str) else None
    if request.text is not None and text is None:
        problems.append("text: must be text")
    elif not (text and text.strip()) and media is None:
        problems.append("text: empty; a message needs text (or an image)")
    at = when(request.at, request.within, now, zone)
    if isinstance(at, str):
        problems.append(at)
    elif at < now - lookback:
        problems.append(
            f"at: {at.isoformat()} is more than {lookback.total_seconds():g} s in the past: "
            "it would expire unsent"
        )
    session = request.session.strip() if isinstance(request.session, str) else ""
    if not session:
        problems.append("session: must name a WAHA session, such as default")
    priority = request.priority
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int | float) or priority != priority
    ):
        problems.append(f"priority: {priority!r} is not a number")
    if problems:
        raise Invalid(problems)
    assert isinstance(at, datetime)
    doc: Doc = {
        "scheduledAt": at,
        "content": text or "",
        "chatId": chat_id,
        "session": session,
        "isSent": False,
        "isDeleted": False,
        "isPicked": False,
    }
    if priority is not None:
        doc["priority"] = priority
    if isinstance(media, dict):
        doc["media"] = media
    if campaign_id is not None:
        doc["campaignId"] = campaign_id
    return doc


def add(store: Store, docs: list[Doc], key: str | None = None) -> list[Any]:
    """Write messages; the ids they have. With `key` (an idempotency key) each gets an `_id`
    derived from it and its place, so that writing them again adds nothing."""
    for n, doc in enumerate(docs):
        if key is not None:
            doc["_id"] = derived_id(doc["scheduledAt"], "request", key, str(n))
        else:
            doc.setdefault("_id", ObjectId())
    insert_once(store.messages.collection, docs)
    return [doc["_id"] for doc in docs]


def planned(store: Store, message_id: Any, wait: float = 0.0) -> Doc | None:
    """The message as the poller has it (status, plannedAt, lastError, ack), waiting up to
    `wait` seconds for a poller to plan it; None when there is no such message."""
    deadline = time.monotonic() + wait
    while True:
        found = store.messages.collection.find_one({"_id": message_id}, VIEW)
        if found is None or "plannedAt" in found or found.get("status") or not wait:
            return found
        if time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


# What `planned` shows of a message.
VIEW = {
    "scheduledAt": 1,
    "plannedAt": 1,
    "slotAt": 1,
    "status": 1,
    "lastError": 1,
    "ack": 1,
    "sentAt": 1,
    "finishedAt": 1,
    "chatId": 1,
    "session": 1,
    "campaignId": 1,
    "isSent": 1,
    "isDeleted": 1,
    "isPicked": 1,
}


def cancel(store: Store, message_id: Any, now: datetime) -> bool:
    """Cancel a message that is still waiting (not being sent, not ended); its campaign is
    counted again. False when there is no such waiting message."""
    doc = store.messages.collection.find_one({"_id": message_id, **UNPICKED, **NOT_DONE})
    if doc is None:
        return False
    where = {**UNPICKED, **NOT_DONE}
    ended = store.messages.end([doc], where, (CANCELLED, CANCELLED_REASON), now, Tally())
    if ended and doc.get("campaignId") is not None:
        store.campaigns.recount(doc["campaignId"], now)
    return ended == 1


def message_id(value: str) -> ObjectId | None:
    """A message id as the API and the CLI take it (24 hex digits), or None."""
    return ObjectId(value) if ObjectId.is_valid(value) else None


def _image(source: Any, files: bool) -> Doc | str:
    """`media` for an image from an http(s) URL, or a file path when `files`; or why it
    cannot be one."""
    if not isinstance(source, str) or not source.strip():
        return "image: must be an http(s) URL" + (" or a file path" if files else "")
    source = source.strip()
    mimetype = mimetypes.guess_type(source.split("?")[0])[0] or ""
    if re.match(r"^https?://\S+$", source):
        kind = mimetype if mimetype.startswith("image/") else "image/jpeg"
        return {"url": source, "mimetype": kind}
    if not files:
        return f"image: {source!r} is not an http(s) URL"
    path = Path(source).expanduser()
    if not path.is_file():
        return f"image: {source!r} is neither an http(s) URL nor a file"
    if not mimetype.startswith("image/"):
        return f"image: {source!r} is not an image file (.jpg, .png, .webp, ...)"
    if path.stat().st_size > MAX_IMAGE_BYTES:
        return (
            f"image: {source!r} is over {MAX_IMAGE_BYTES // (1024 * 1024)} MB: give a URL instead"
        )
    data = base64.b64encode(path.read_bytes()).decode()
    return {"data": data, "mimetype": mimetype, "filename": path.name}


def as_request(body: Mapping[str, Any]) -> Request:
    """A Request from a JSON object (the API): its fields by name, `in` for `within`."""
    known = {"to", "text", "at", "in", "session", "priority", "image"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise Invalid([f"{name}: not a field of a message" for name in unknown])
    return Request(
        body.get("to"),
        body.get("text"),
        body.get("at"),
        body.get("in"),
        body.get("session", "default"),
        body.get("priority"),
        body.get("image"),
    )
