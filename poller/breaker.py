"""Circuit breakers for WAHA: one per WhatsApp session (keyed by its name), and one per WAHA
server (keyed by `servers.server_key`).

A breaker opens at once when WAHA says the session (or the server) cannot send: a refused API
key, an unreachable server, a session that is not started or not WORKING. It opens after
`threshold` consecutive failures of any other kind (5xx, timeouts, "try later"). While open, the
session's messages are not claimed. After `cooldown` it is half-open: messages are claimed again,
and the first answer closes it (a success) or opens it again (a failure).

The state lives in the process, across ticks; a new process starts with every breaker closed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass
class _State:
    failures: int = 0
    open_until: datetime | None = None
    reason: str = ""


class Breakers:
    def __init__(self, cooldown: timedelta, threshold: int = 3) -> None:
        self.cooldown = cooldown
        self.threshold = threshold
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()  # sessions are sent for side by side

    def open(self, now: datetime) -> dict[str, str]:
        """The keys whose breaker is open now, with why; half-open ones are not listed."""
        with self._lock:
            return {
                key: state.reason
                for key, state in self._states.items()
                if state.open_until is not None and now < state.open_until
            }

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._states.pop(key, None)

    def failed(self, key: str, now: datetime, reason: str, at_once: bool = False) -> bool:
        """Count a failure; True when the breaker is (now) open."""
        with self._lock:
            state = self._states.setdefault(key, _State())
            state.failures += 1
            half_open = state.open_until is not None  # cool-down passed: one failure reopens it
            if at_once or half_open or state.failures >= self.threshold:
                state.open_until, state.reason = now + self.cooldown, reason
                return True
            return False
