"""What one tick did, counted: returned by `tick`, logged, written to the heartbeat and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from poller.stats import Tally

_NOT_COUNTS = ("lateness", "pacing_delay", "next_at", "servers", "by_server", "stats")


@dataclass
class TickCounts:
    claimed: int = 0
    sent: int = 0
    # Attempted, and to be tried again later: WAHA or the session could not take it now.
    retried: int = 0
    failed: int = 0
    expired: int = 0
    unknown: int = 0
    cancelled: int = 0
    # New messages planned in their session's lane.
    planned: int = 0
    # Waiting messages planned again: their lane fell behind or had a hole, or an outage ended.
    replanned: int = 0
    # Planned again for later by the daily cap or the quiet hours.
    held: int = 0
    # Claimed, then given back without a request to WAHA (a stop, a paused session or campaign,
    # another poller's turn): claimable again at once.
    released: int = 0
    # Occurrences of recurring schedules materialised as a campaign, and missed (no poller ran).
    occurred: int = 0
    missed: int = 0
    key_rejected: bool = False
    # Of each message sent, in seconds: sentAt - its planned time (the lateness metric), and
    # its planned time - scheduledAt (how long pacing, a cap or quiet hours held it).
    lateness: list[float] = field(default_factory=list)
    pacing_delay: list[float] = field(default_factory=list)
    # When there is something to send next: the next message's scheduled time, or a paced
    # session's next turn. `poller run` ticks again then.
    next_at: datetime | None = None
    # Each WAHA server as this tick found it (`servers._state`): reachable, key, breaker, and
    # its sessions' names and statuses (None: not listed).
    servers: list[dict[str, Any]] = field(default_factory=list)
    # Server -> outcome (sent, retried, failed, unknown) -> how many sends it answered so.
    by_server: dict[str, dict[str, int]] = field(default_factory=dict)
    # What the tick's transitions change in each campaign's stats.
    stats: Tally = field(default_factory=Tally)

    def totals(self) -> dict[str, int | bool]:
        """The counts alone, as written to the heartbeat and returned by run_once()."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in _NOT_COUNTS}

    def add(self, other: TickCounts) -> None:
        """Add the counts of `other` (one session's sends, made in parallel) to these."""
        for name, value in other.totals().items():
            if name == "key_rejected":
                self.key_rejected = self.key_rejected or bool(value)
            else:
                setattr(self, name, getattr(self, name) + value)
        self.lateness.extend(other.lateness)
        self.pacing_delay.extend(other.pacing_delay)
        self.stats.add(other.stats)
        for server, outcomes in other.by_server.items():
            for outcome, n in outcomes.items():
                self.count_send(server, outcome, n)

    def count_send(self, server: str, outcome: str, n: int = 1) -> None:
        """Count an answer of WAHA `server` to a send."""
        outcomes = self.by_server.setdefault(server, {})
        outcomes[outcome] = outcomes.get(outcome, 0) + n

    def summary(self) -> str:
        return (
            f"claimed={self.claimed} sent={self.sent} retried={self.retried} "
            f"failed={self.failed} expired={self.expired} unknown={self.unknown} "
            f"cancelled={self.cancelled} planned={self.planned} replanned={self.replanned} "
            f"held={self.held} released={self.released} occurred={self.occurred} "
            f"missed={self.missed}"
        )
