"""WAHA's webhooks, as a WAHA server posts them: `message.ack` and `message` events shaped
like its published schemas (WAHAWebhookMessageAck, WAHAWebhookMessage), by edition.

WAHA 2024.11.5 and later (`LATEST`) sign the raw body with HMAC-SHA512 in X-Webhook-Hmac when
the webhook has an `hmac.key`, send its custom headers and X-Webhook-Request-Id /
X-Webhook-Timestamp, post again after a failure (15 times, 2 s apart, by default) and give each
event an `id` and a `timestamp`; a group message's ids end with its participant. WAHA Core
2024.10.8 (`CORE_2024`), as observed: one unsigned post per event, with no custom header, no
retry, and no `id` or `timestamp` in the body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ACK_NAMES = {-1: "ERROR", 0: "PENDING", 1: "SERVER", 2: "DEVICE", 3: "READ", 4: "PLAYED"}
ME = {"id": "15550001111@c.us", "pushName": "Shop"}


@dataclass(frozen=True)
class Edition:
    """What a WAHA version posts: `version` (YYYY.M.D) and its `engine`."""

    version: str = "2026.7.1"
    engine: str = "NOWEB"

    @property
    def full(self) -> bool:
        """Signatures, custom headers, retries, event ids (WAHA 2024.11.5 and later)."""
        return tuple(int(p) for p in self.version.split(".")) >= (2024, 11, 5)


LATEST = Edition()
CORE_2024 = Edition("2024.10.8", "NOWEB")


def ack_event(
    message_id: str,
    ack: int,
    session: str = "default",
    to: str = "",
    edition: Edition = LATEST,
    participant: str = "",
) -> dict[str, Any]:
    """A `message.ack` event for a message this account sent, named by `message_id` as the
    engine names it in events (`true_<chat>_<id>`); in a group, the id ends with
    `participant` where the edition appends it."""
    chat = to or message_id.split("_")[1]
    if participant and edition.full:
        message_id = f"{message_id}_{participant}"
    return _event(
        "message.ack",
        session,
        {
            "id": message_id,
            "from": ME["id"],
            "to": chat,
            "participant": participant or chat,
            "fromMe": True,
            "ack": ack,
            "ackName": ACK_NAMES.get(ack, "UNKNOWN"),
            "_data": {},
        },
        edition,
    )


def message_event(
    chat_id: str,
    body: str,
    session: str = "default",
    edition: Edition = LATEST,
    at: float | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `message` event: someone wrote `body` to this account, at `at` (Unix seconds; now),
    with the engine's raw message `data`."""
    return _event(
        "message",
        session,
        {
            "id": f"false_{chat_id}_{secrets.token_hex(10).upper()}",
            "timestamp": int(time.time() if at is None else at),
            "from": chat_id,
            "fromMe": False,
            "source": "app",
            "to": ME["id"],
            "participant": "",
            "body": body,
            "hasMedia": False,
            "mediaUrl": "",
            "ack": 1,
            "ackName": "SERVER",
            "_data": data or {},
        },
        edition,
    )


def _event(name: str, session: str, payload: dict[str, Any], edition: Edition) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": name,
        "session": session,
        "metadata": {},
        "me": ME,
        "payload": payload,
        "engine": edition.engine,
        "environment": {
            "version": edition.version,
            "engine": edition.engine,
            "tier": "CORE",
            "browser": "",
            "platform": "linux/x64",
            "worker": {"id": "worker-1"},
        },
    }
    if edition.full:
        stamp = {"id": "evt_" + secrets.token_hex(13), "timestamp": int(time.time() * 1000)}
        event = {**stamp, **event}
    return event


@dataclass
class Webhook:
    """One webhook of a WAHA session: where it posts, how it signs, how often it retries, as
    its `edition` does (WAHA Core 2024.10.8 reads none of `hmac_key`, `custom_headers` and
    `attempts`)."""

    url: str
    hmac_key: str = ""
    custom_headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 1
    delay: float = 0.2
    edition: Edition = LATEST
    # Each post's answer status, in order (0: no answer).
    answers: list[int] = field(default_factory=list)

    def post(self, event: dict[str, Any] | bytes) -> int:
        """Post an event (or raw bytes) until it gets a 2xx or the attempts run out; the last
        status (0 when nothing answered)."""
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"WAHA/{self.edition.version}"}
        attempts = 1
        if self.edition.full:
            attempts = self.attempts
            headers.update(self.custom_headers)
            headers["X-Webhook-Request-Id"] = secrets.token_hex(8)
            headers["X-Webhook-Timestamp"] = str(int(time.time() * 1000))
            if self.hmac_key:
                signature = hmac.new(self.hmac_key.encode(), body, hashlib.sha512).hexdigest()
                headers.update({"X-Webhook-Hmac": signature, "X-Webhook-Hmac-Algorithm": "sha512"})
        status = 0
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.delay)
            try:
                status = httpx.post(self.url, content=body, headers=headers, timeout=30).status_code
            except httpx.HTTPError:
                status = 0
            self.answers.append(status)
            if 200 <= status < 300:
                break
        return status
