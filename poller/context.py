"""What every step of one tick works with, and the one reading of a session's daily cap."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from poller.breaker import Breakers
from poller.contract import show
from poller.pacing import Pacing
from poller.servers import Routes, Servers
from poller.store import Store


@dataclass
class Memory:
    """What one process carries from one tick to the next (a daemon keeps one; without it, a
    tick starts afresh): why each lane could not send as last noted, when the open campaigns
    were last checked, when a recurring schedule occurs next, and whether what an earlier
    version left was upgraded."""

    blocked: dict[str, str | None] = field(default_factory=dict)
    checked_at: datetime | None = None
    # When the next occurrence of a recurring schedule comes within reach, to materialise it.
    occurs_at: datetime | None = None
    upgraded: bool = False


@dataclass(frozen=True)
class Context:
    """What every step of one tick works with."""

    store: Store
    servers: Servers
    clock: Callable[[], datetime]
    stop: threading.Event
    breakers: Breakers
    pacing: Pacing
    # The `dailyCap` of each session document that sets one, read once a tick when needed.
    caps: Caps = field(default_factory=lambda: Caps(None))
    # Which WAHA server each session sends through in this tick.
    routes: Routes = field(default_factory=Routes)
    memory: Memory = field(default_factory=Memory)
    # The campaigns whose messages wait, paused (as read at the start of the tick).
    held: tuple[Any, ...] = ()

    def paused(self, doc: Mapping[str, Any]) -> bool:
        """Whether the message belongs to a campaign in `held` (by id or its hex string)."""
        return str(doc.get("campaignId")) in {str(c) for c in self.held}


class Caps:
    """The sessions' `dailyCap`s, read from the store the first time a tick needs one."""

    def __init__(self, store: Store | None) -> None:
        self._store = store
        self._caps: dict[str, Any] | None = None

    def all(self) -> dict[str, Any]:
        if self._caps is None:
            self._caps = self._store.sessions.daily_caps() if self._store else {}
        return self._caps


def daily_cap(t: Context, session: str) -> int | str | None:
    """The session's daily cap in this tick (see `session_cap`)."""
    return session_cap(t.caps.all(), session, t.pacing.daily_cap, t.store.sessions.collection.name)


def session_cap(
    caps: Mapping[str, Any], session: str, default: int | None, where: str
) -> int | str | None:
    """The session's daily cap: its document's `dailyCap` (`caps`, by session name), else
    DAILY_CAP (`default`; None: no cap). A `dailyCap` of 0, or one that is not a whole number,
    is a reason not to send. `where`: the sessions collection, for the reason."""
    if session not in caps:
        return default
    value = caps[session]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    where = f"WhatsApp session '{session}' in {where}"
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
        if value == 0:
            return f"dailyCap of {where} is 0: it sends nothing until it is raised."
    return (
        f"dailyCap {show(value)} of {where} is not a whole number: nothing is sent for this "
        "session until it is fixed."
    )
