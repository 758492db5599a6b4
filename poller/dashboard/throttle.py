"""Failed log-ins counted per client address, so that guessing the token is slow.

An address (an IPv6 client by its /64, which one host usually holds whole) that failed LIMIT
times within WINDOW_SECONDS is refused until its oldest failure leaves the window: its token
is not even compared. Successes are not counted. At most CAPACITY addresses are remembered:
beyond that, the one whose last failure is oldest is forgotten, so that a client choosing new
addresses costs memory only up to the cap. A failure is logged once per address per window.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from loguru import logger

# Failed log-ins an address may make within WINDOW_SECONDS; the next attempt is refused (429).
LIMIT = 10
WINDOW_SECONDS = 60.0
# Addresses remembered at most (about 1 KiB each): 10 MiB at most, whoever sends the failures.
CAPACITY = 10_000


class Throttle:
    """Failed log-ins by client, shared by the server's threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        # By client, the client whose last failure is oldest first.
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        """The addresses remembered now."""
        return len(self._failures)

    def retry_after(self, address: str | None) -> int | None:
        """Seconds until `address` may try again, or None when it may try now."""
        with self._lock:
            now = self.clock()
            self._forget(now)
            found = self._failures.get(_client(address))
            if found is None or len(found.times) < LIMIT:
                return None
            return max(1, math.ceil(found.times[0] + WINDOW_SECONDS - now))

    def failed(self, address: str | None) -> None:
        """Count a failed log-in from `address`, and log it unless one was logged within the
        window (never what was tried: it may be a near miss of the token)."""
        with self._lock:
            now = self.clock()
            self._forget(now)
            key = _client(address)
            found = self._failures.pop(key, None) or _Failures()
            found.times.append(now)
            self._failures[key] = found  # now the last in order
            while len(self._failures) > CAPACITY:
                self._failures.popitem(last=False)
            if now - found.logged < WINDOW_SECONDS:
                return
            found.logged = now
        logger.warning("dashboard: failed log-in from {}", address)

    def _forget(self, now: float) -> None:
        """Drop the addresses whose last failure left the window (they come first)."""
        while self._failures:
            oldest = next(iter(self._failures.values()))
            if now - oldest.times[-1] < WINDOW_SECONDS:
                return
            self._failures.popitem(last=False)


class _Failures:
    """One client's last LIMIT failures, oldest first, and when one was last logged."""

    __slots__ = ("times", "logged")

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=LIMIT)
        self.logged = -math.inf


def _client(address: str | None) -> str:
    """The key of a client: its IPv4 address, or its IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
