"""The data contract with the web app: what a message document must hold to be sent, and how
each of its fields is read. Pure functions of a document: no database, no network.

A message's `status` on its way: none or `pending` while it waits, `claimed` and `sending` while
a poller holds it, `retry` when it waits to be tried again; `sent`, `failed`, `expired`,
`unknown` or `cancelled` at the end. `store/messages.py` holds every write that moves it, and
draws the whole life.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId

PENDING, RETRY, CLAIMED, SENDING = "pending", "retry", "claimed", "sending"
SENT, FAILED, EXPIRED, UNKNOWN = "sent", "failed", "expired", "unknown"
CANCELLED = "cancelled"
FINAL = (SENT, FAILED, EXPIRED, UNKNOWN, CANCELLED)
# A campaign's status once the poller has finished with it.
COMPLETED = ("completed", "completed_with_failures")
# What the web app writes in a campaign's status to stop it for a while, or for good.
PAUSED = "paused"
# Any "yes" the web app may write in isSent / isDeleted: the message is done, whatever its
# status. The one definition of "done": the queries (NOT_DONE), the checks (`done`) and the
# campaign stats (`done_expression`) all read it from here.
YES = [True, 1, "true"]
DONE_FLAGS = ("isSent", "isDeleted")
NOT_DONE = {flag: {"$nin": YES} for flag in DONE_FLAGS}

# WhatsApp ids WAHA can send to: a person (c.us, lid), a group (g.us), a channel (newsletter).
CHAT_ID = re.compile(
    r"^(?:\d{5,20}@c\.us|\d{5,25}@lid|\d{5,20}(?:-\d{5,20})?@g\.us|\d{5,25}@newsletter)$"
)
# A bare phone number, international format; spaces, dashes, dots and brackets are ignored.
PHONE = re.compile(r"^\+?[\d\s().\-]+$")
MIME_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")


@dataclass(frozen=True)
class Media:
    file: dict[str, str]  # WAHA's `file`: mimetype, url or data, filename
    caption: str | None
    image: bool  # image/* goes through /api/sendImage, anything else through /api/sendFile


@dataclass(frozen=True)
class Ready:
    session: str
    chat_id: str
    text: str  # the caption, for media
    media: Media | None = None


@dataclass(frozen=True)
class ById:
    """A message that names its session by `sessionId`: the session document's `name`."""

    id: ObjectId | str | int


# -- which WAHA session sends a message: the one rule, used by claim, hold, pacing and send ------


def session_ref(doc: Mapping[str, Any]) -> str | ById | None:
    """`session` when it holds a name (surrounding spaces dropped), else its `sessionId`;
    None when the document names neither usably (`prepare` says why)."""
    session = doc.get("session")
    if isinstance(session, str) and session.strip():
        return session.strip()
    session_id = doc.get("sessionId")
    if isinstance(session_id, ObjectId | str | int) and not isinstance(session_id, bool):
        if session_id != "":
            return ById(session_id)
    return None


def session_name(doc: Mapping[str, Any], names: Mapping[str, str]) -> str | None:
    """The WAHA session that sends `doc`; `names` maps a session document's id (as text) to
    its name. None when there is none."""
    ref = session_ref(doc)
    if isinstance(ref, ById):
        return names.get(str(ref.id))
    return ref


def clean_session_name(raw: object) -> str | None:
    """A session document's `name` as a session name, or None."""
    return raw.strip() if isinstance(raw, str) and raw.strip() else None


def done(doc: Mapping[str, Any], flag: str | None = None) -> bool:
    """Whether the web app marked the message done (`flag`: that flag only)."""
    flags = DONE_FLAGS if flag is None else (flag,)
    return any(_yes(doc.get(name)) for name in flags)


def done_expression(flag: str) -> dict[str, Any]:
    """`done(doc, flag)` as an aggregation expression."""
    return {"$in": [{"$ifNull": [f"${flag}", False]}, YES]}


def _yes(value: object) -> bool:
    # As MongoDB compares: true is not 1, and 1.0 is 1.
    if isinstance(value, bool):
        return value
    return (isinstance(value, int | float) and value == 1) or value == "true"


# -- what to send -----------------------------------------------------------------------------


def prepare(doc: Mapping[str, Any], names: Mapping[str, str], where: str) -> Ready | str:
    """Check a message against the data contract: what to send, or why it cannot be sent.
    `names`: session names by session document id (see `session_name`); `where`: the sessions
    collection, for the reason."""
    found = content(doc)
    if isinstance(found, str):
        return found
    text, media = found
    to = addressee(doc, names, where)
    if isinstance(to, str):
        return to
    return Ready(to[0], to[1], text, media)


def addressee(
    doc: Mapping[str, Any], names: Mapping[str, str], where: str
) -> tuple[str, str] | str:
    """A message's WhatsApp session and chat id, or why it has none (see `prepare`)."""
    chat_id = normalise_chat_id(doc.get("chatId"))
    if chat_id is None:
        return f"chatId {show(doc.get('chatId'))} is not a WhatsApp id or phone number."
    session = session_name(doc, names)
    if session is None:
        return no_session(doc, where)
    return session, chat_id


def no_session(doc: Mapping[str, Any], where: str, what: str = "message") -> str:
    """Why a document (a message, or a recurring schedule's definition: `what`) has no WhatsApp
    session (`session_name` found none); `where`: the sessions collection."""
    session_id = doc.get("sessionId")
    if session_id is None or session_id == "":
        return f"The {what} names no WhatsApp session (set session or sessionId)."
    if session_ref(doc) is None:
        return f"sessionId {show(session_id)} is not an id (an ObjectId or a string)."
    return (
        f"sessionId {show(session_id)} matches no WhatsApp session document with a name in {where}."
    )


def content(doc: Mapping[str, Any], what: str = "message") -> tuple[str, Media | None] | str:
    """What a document (a message, or a recurring schedule's definition: `what`) sends: its
    text (the caption, for media) and its media, or why it has nothing that can be sent."""
    text = doc.get("content")
    if doc.get("media") is not None:
        media = _media(doc["media"], text)
        if isinstance(media, str):
            return media
        return media.caption or "", media
    if not isinstance(text, str) or not text.strip():
        return f"The {what} has no text to send (content is empty or missing)."
    return text, None


def _media(raw: object, text: object) -> Media | str:
    """WAHA's `file` and caption from a message's `media`, or why it cannot be sent."""
    shape = "{url or data, mimetype, filename, caption}"
    if not isinstance(raw, dict):
        return f"media must be an object {shape}, but it is {show(raw)}."
    mimetype = raw.get("mimetype")
    if not isinstance(mimetype, str) or not MIME_TYPE.match(mimetype.strip()):
        return f"media.mimetype {show(mimetype)} is not a MIME type such as image/jpeg."
    url, data = raw.get("url"), raw.get("data")
    if (url is None) == (data is None):
        return "media needs either a url or base64 data (exactly one of them)."
    file = {"mimetype": mimetype.strip()}
    if url is not None:
        if not isinstance(url, str) or not re.match(r"^https?://\S+$", url.strip()):
            return f"media.url {show(url)} is not an http:// or https:// URL."
        file["url"] = url.strip()
    else:
        try:
            if not isinstance(data, str) or not data:
                raise ValueError
            base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error):
            return "media.data is not base64 (plain, without a data: prefix)."
        file["data"] = data
    for name in ("filename", "caption"):
        if raw.get(name) is not None and not isinstance(raw.get(name), str):
            return f"media.{name} must be text, but it is {show(raw.get(name))}."
    if raw.get("filename"):
        file["filename"] = raw["filename"]
    caption = raw.get("caption") or (text if isinstance(text, str) else None)
    caption = caption if caption and caption.strip() else None
    return Media(file, caption, file["mimetype"].lower().startswith("image/"))


def normalise_chat_id(raw: object) -> str | None:
    """A WAHA chat id, or None. Bare phone numbers become `<digits>@c.us`."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    value = raw.strip()
    if value.endswith("@s.whatsapp.net"):
        value = value.removesuffix("@s.whatsapp.net") + "@c.us"
    if CHAT_ID.match(value):
        return value
    if PHONE.match(value):
        digits = re.sub(r"\D", "", value)
        if 7 <= len(digits) <= 15:
            return f"{digits}@c.us"
    return None


def message_key(waha_id: str) -> str | None:
    """The engine's own id of a message, in any of WAHA's forms: `<fromMe>_<chat>_<id>`, with
    `_<participant>` after it in groups (the chat `@c.us`, `@g.us` or `@lid`), or the bare id.
    Acks name a message by this part however its chat is written."""
    parts = waha_id.strip().split("_")
    if len(parts) >= 3 and parts[0] in ("true", "false") and "@" in parts[1]:
        return parts[2] or None
    return waha_id.strip() or None


# -- references ---------------------------------------------------------------------------------


def id_variants(value: Any) -> list[Any]:
    """The web app may store a reference as an ObjectId or as its hex string: match both."""
    variants = [value]
    if isinstance(value, str) and ObjectId.is_valid(value):
        variants.append(ObjectId(value))
    elif isinstance(value, ObjectId):
        variants.append(str(value))
    return variants


def derived_id(at: datetime, *parts: str) -> ObjectId:
    """The same ObjectId for the same parts, in every poller: a document `poller` writes once
    whoever writes it (MongoDB keeps the first `_id`). Its time part is `at`'s, the rest a
    hash of the parts."""
    key = "|".join(parts).encode()
    return ObjectId(int(at.timestamp()).to_bytes(4, "big") + hashlib.sha256(key).digest()[:8])


def campaign_ref(value: object) -> bool:
    """Whether a `campaignId` as written can name a campaign."""
    return isinstance(value, ObjectId | str | int) and not isinstance(value, bool)


def show(value: object) -> str:
    """A value as a reason quotes it: its repr, shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
