"""WAHA's event posts that `poller run` refused, by reason: counted for /metrics, kept per minute
for the last hour (the heartbeat carries them to `poller check`, `poller status` and the
dashboard), and logged once per reason per minute.

A refused post is an event lost for good where WAHA does not retry (WAHA Core), so a
misconfigured webhook must show, not only in WAHA's own log.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from datetime import datetime, timedelta

from loguru import logger

HOUR = timedelta(hours=1)
LOG_EVERY = timedelta(minutes=1)
# What to do about each reason, for the log line.
ADVICE = {
    "unsigned": (
        "WAHA Core signs nothing and sends no custom header: end the webhook's URL with "
        "/<WEBHOOK_SECRET>"
    ),
    "bad_signature": "the webhook's hmac.key is not WEBHOOK_HMAC_KEY",
    "wrong_secret": "the secret in the webhook's URL or X-Poller-Secret is not WEBHOOK_SECRET",
    "too_large": "raise WEBHOOK_MAX_BYTES if WAHA's events are this large",
}


class Refusals:
    # Each reason in words, as `poller check` shows it.
    REASONS = {
        "unsigned": "no signature or secret",
        "bad_signature": "wrong signature",
        "wrong_secret": "wrong secret",
        "too_large": "body too large",
        "bad_body": "not a WAHA event",
        "not_post": "not a POST",
    }

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self._minutes: deque[tuple[datetime, Counter[str]]] = deque()
        self._logged: dict[str, tuple[datetime, int]] = {}  # reason -> last line, refused since
        self._lock = threading.Lock()

    def add(self, reason: str, now: datetime, peer: object = None) -> None:
        """Count one refused post; log it unless this reason was logged within a minute."""
        minute = now.replace(second=0, microsecond=0)
        with self._lock:
            self.totals[reason] += 1
            if not self._minutes or self._minutes[-1][0] != minute:
                self._minutes.append((minute, Counter()))
            self._minutes[-1][1][reason] += 1
            while self._minutes and self._minutes[0][0] <= now - HOUR:
                self._minutes.popleft()
            last, since = self._logged.get(reason, (None, 0))
            if last is not None and now - last < LOG_EVERY:
                self._logged[reason] = (last, since + 1)
                return
            self._logged[reason] = (now, 0)
        more = f"; {since} more since the last such line" if since else ""
        advice = f" ({ADVICE[reason]})" if reason in ADVICE else ""
        logger.warning(
            "WAHA event post from {} refused: {}{}{}", peer, self.REASONS[reason], advice, more
        )

    def last_hour(self, now: datetime) -> dict[str, int]:
        """Refused posts of the last hour, by reason."""
        found: Counter[str] = Counter()
        with self._lock:
            for minute, counts in self._minutes:
                if minute > now - HOUR:
                    found.update(counts)
        return dict(found)


def describe(counts: dict[str, int] | None) -> str | None:
    """The last hour's refusals in one line, or None when there were none: "WAHA's event posts
    refused in the last hour: 113, no signature or secret"."""
    if not counts:
        return None
    parts = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    listed = "; ".join(f"{n}, {Refusals.REASONS.get(reason, reason)}" for reason, n in parts)
    return f"WAHA's event posts refused in the last hour: {listed}"
