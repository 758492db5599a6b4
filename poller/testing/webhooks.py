"""WAHA's webhooks, as a WAHA server posts them: `message.ack` and `message` events shaped
like its published schemas (WAHAWebhookMessageAck, WAHAWebhookMessage), signed with HMAC-SHA512
of the raw body in X-Webhook-Hmac when the webhook has an `hmac.key`, with its custom headers,
and posted again after a failure (WAHA's `retries`)."""

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
ENVIRONMENT = {
    "version": "2026.7.1",
    "engine": "NOWEB",
    "tier": "CORE",
    "browser": "",
    "platform": "linux/x64",
    "worker": {"id": "worker-1"},
}


def ack_event(message_id: str, ack: int, session: str = "default", to: str = "") -> dict[str, Any]:
    """A `message.ack` event for a message this account sent."""
    chat = to or message_id.split("_")[1]
    return _event(
        "message.ack",
        session,
        {
            "id": message_id,
            "from": ME["id"],
            "to": chat,
            "participant": chat,
            "fromMe": True,
            "ack": ack,
            "ackName": ACK_NAMES[ack],
            "_data": {},
        },
    )


def message_event(chat_id: str, body: str, session: str = "default") -> dict[str, Any]:
    """A `message` event: someone wrote `body` to this account."""
    return _event(
        "message",
        session,
        {
            "id": f"false_{chat_id}_{secrets.token_hex(10).upper()}",
            "timestamp": int(time.time()),
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
            "_data": {},
        },
    )


def _event(name: str, session: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "evt_" + secrets.token_hex(13),
        "timestamp": int(time.time() * 1000),
        "session": session,
        "metadata": {},
        "engine": "NOWEB",
        "event": name,
        "payload": payload,
        "me": ME,
        "environment": ENVIRONMENT,
    }


@dataclass
class Webhook:
    """One webhook of a WAHA session: where it posts, how it signs, how often it retries."""

    url: str
    hmac_key: str = ""
    custom_headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 1
    delay: float = 0.2
    # Each post's answer status, in order (0: no answer).
    answers: list[int] = field(default_factory=list)

    def post(self, event: dict[str, Any] | bytes) -> int:
        """Post an event (or raw bytes) until it gets a 2xx or the attempts run out; the last
        status (0 when nothing answered)."""
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        headers = {"Content-Type": "application/json", **self.custom_headers}
        headers["X-Webhook-Request-Id"] = secrets.token_hex(8)
        headers["X-Webhook-Timestamp"] = str(int(time.time() * 1000))
        if self.hmac_key:
            signature = hmac.new(self.hmac_key.encode(), body, hashlib.sha512).hexdigest()
            headers.update({"X-Webhook-Hmac": signature, "X-Webhook-Hmac-Algorithm": "sha512"})
        status = 0
        for attempt in range(self.attempts):
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
