"""When a WhatsApp session may send: random gaps, a daily cap, quiet hours, a typing pause.

WhatsApp bans numbers whose traffic looks automated: bursts, fixed gaps, sending all night.
These rules are pure time arithmetic; the store keeps the shared state (`Store.reserve`), so
that they hold across replicas.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from poller.settings import Settings


@dataclass(frozen=True)
class Pacing:
    gap_min: float = 0.0
    gap_max: float = 0.0
    typing: bool = False
    typing_max: float = 8.0
    daily_cap: int | None = None
    zone: ZoneInfo = ZoneInfo("UTC")
    quiet_hours: tuple[time, time] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Pacing:
        return cls(
            settings.pacing_min_seconds,
            settings.pacing_max_seconds,
            settings.typing,
            settings.typing_max_seconds,
            settings.daily_cap,
            settings.zone,
            settings.quiet_hours,
        )

    @property
    def paced(self) -> bool:
        return self.gap_max > 0

    def gap(self) -> timedelta:
        """The wait before a session's next message: random, so that no rhythm shows."""
        return timedelta(seconds=random.uniform(self.gap_min, self.gap_max))

    def day(self, now: datetime) -> date:
        """The local day a send at `now` counts towards, for the daily cap."""
        return now.astimezone(self.zone).date()

    def next_day(self, now: datetime) -> datetime:
        """The start of the next local day (UTC): when a capped session may send again."""
        tomorrow = datetime.combine(self.day(now) + timedelta(days=1), time(), self.zone)
        return tomorrow.astimezone(UTC)

    def quiet_until(self, now: datetime) -> datetime | None:
        """The end of the quiet hours (UTC) when `now` falls inside them, else None."""
        if self.quiet_hours is None:
            return None
        start, end = self.quiet_hours
        local = now.astimezone(self.zone)
        clock = local.time().replace(tzinfo=None)
        inside = start <= clock < end if start < end else (clock >= start or clock < end)
        if not inside:
            return None
        day = local.date() if clock < end else local.date() + timedelta(days=1)
        return datetime.combine(day, end, self.zone).astimezone(UTC)

    def describe_quiet(self) -> str:
        assert self.quiet_hours is not None
        start, end = self.quiet_hours
        return f"{start:%H:%M}-{end:%H:%M} {self.zone.key}"

    def typing_pause(self, text: str) -> float:
        """Seconds of "typing...": a second and a bit per 25 characters, at most `typing_max`."""
        return min(self.typing_max, 1.0 + len(text) / 25)
