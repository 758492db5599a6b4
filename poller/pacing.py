"""When a WhatsApp session may send: random gaps, a daily cap, quiet hours, a typing pause.

WhatsApp bans numbers whose traffic looks automated: bursts, fixed gaps, sending all night.
These rules are pure time arithmetic; the store keeps the shared state (`Store.reserve`), so
that they hold across replicas.
"""

from __future__ import annotations

import math
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
        """The local day a send at `now` counts towards, for the daily cap: the date of the last
        local midnight at or before `now`. When clocks go back over midnight, the new day goes
        on, so that the count of a day is never started again."""
        today = now.astimezone(self.zone).date()
        tomorrow = today + timedelta(days=1)
        return tomorrow if self._midnight(tomorrow) <= now else today

    def next_day(self, now: datetime) -> datetime:
        """The start of the next local day (UTC): when a capped session may send again."""
        return self._midnight(self.day(now) + timedelta(days=1))

    def quiet_until(self, now: datetime) -> datetime | None:
        """The end of the quiet hours (UTC) when `now` falls inside them, else None.

        They are read on the local clock, and end at the first instant after `now` that it
        reads outside them: when it reaches their end, passes it (in an hour that clocks skip),
        or goes back to before their start (in an hour that clocks repeat)."""
        at = now.astimezone(UTC)
        while (end := self._quiet_end(at)) is not None:
            # When the clock reads `end`, unless clocks change before: then read it again there.
            at = self._next_change(at, at + (end - self._wall(at)))
        return at if at > now else None

    def _quiet_end(self, at: datetime) -> datetime | None:
        """The local time at which the quiet hours that `at` is inside end, or None."""
        if self.quiet_hours is None:
            return None
        start, end = self.quiet_hours
        local = self._wall(at)
        clock = local.time()
        inside = start <= clock < end if start < end else (clock >= start or clock < end)
        if not inside:
            return None
        day = local.date() if clock < end else local.date() + timedelta(days=1)
        return datetime.combine(day, end)

    def _midnight(self, day: date) -> datetime:
        """When a local day begins (UTC): when the clock first reads its 00:00, or passes it."""
        wall = datetime.combine(day, time())
        first, second = (wall.replace(tzinfo=self.zone, fold=f).astimezone(UTC) for f in (0, 1))
        # A skipped 00:00 is read with the offset of before the change (fold=0, `first`) or of
        # after it (fold=1, `second`): the clock passes 00:00 at the change, between the two.
        return first if first <= second else self._next_change(second, first)

    def _next_change(self, after: datetime, until: datetime) -> datetime:
        """The first change of clocks after `after`, when there is one by `until`, else `until`.
        For spans of a day or so: clocks change months apart, and at a whole second."""
        offset = self._offset(after.timestamp())
        if self._offset(until.timestamp()) == offset:
            return until
        low, high = math.floor(after.timestamp()) + 1, math.floor(until.timestamp())
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if self._offset(middle) == offset else (low, middle)
        return datetime.fromtimestamp(low, UTC)

    def _offset(self, timestamp: float) -> timedelta | None:
        return datetime.fromtimestamp(timestamp, self.zone).utcoffset()

    def _wall(self, at: datetime) -> datetime:
        return at.astimezone(self.zone).replace(tzinfo=None)

    def describe_quiet(self) -> str:
        assert self.quiet_hours is not None
        start, end = self.quiet_hours
        return f"{start:%H:%M}-{end:%H:%M} {self.zone.key}"

    def typing_pause(self, text: str) -> float:
        """Seconds of "typing...": a second and a bit per 25 characters, at most `typing_max`."""
        return min(self.typing_max, 1.0 + len(text) / 25)
