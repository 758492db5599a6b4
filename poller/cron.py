"""Cron rules on a local clock: when a recurring schedule's occurrences happen. Pure time
arithmetic: no database.

A rule is read on the wall clock of its time zone by cronsim (crontab(5): day of week 0 and 7
are Sunday; a restricted day of month and day of week match either). Each local time it
names becomes an instant by one rule, Python's own (`fold=0`):

- a local time that does not exist, in the hour skipped when clocks go forward, happens as
  late after the change as it would have without it (01:30 on the day London skips from 01:00
  to 02:00 happens at 02:30 BST);
- a local time that happens twice, in the hour repeated when clocks go back, happens the first
  time only (01:30 BST, not 01:30 GMT an hour later);
- two local times that fall on one instant (01:30 moved to 02:30, and 02:30 itself) make one
  occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

# Clocks never move by more than this at once (the largest change in the tz database is 2 h).
MAX_SHIFT = timedelta(hours=3)


@dataclass(frozen=True)
class Rule:
    cron: str
    zone: ZoneInfo

    @property
    def key(self) -> str:
        """What identifies the rule: an edit of either part makes a new one."""
        return f"{self.cron} {self.zone.key}"


def zone(name: object) -> ZoneInfo | str:
    """The IANA time zone called `name`, or why there is none, in a sentence: also for a folder
    of regions (`US`, `Europe`) and for a file of the database that is no zone (`zone.tab`)."""
    if isinstance(name, str) and name.strip():
        try:
            return ZoneInfo(name.strip())
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    return f"timezone {name!r} is not an IANA time zone name such as 'Europe/London'."


def parse(cron: object, timezone: object) -> Rule | str:
    """The rule of a cron expression (5 fields, minute to day of week) in an IANA zone, or
    why it cannot be used, in a sentence."""
    if not isinstance(cron, str) or not cron.strip():
        return "cron is missing: it needs 5 fields, such as '0 9 * * 1' (Mondays at 09:00)."
    fields = cron.split()
    if len(fields) != 5:
        return (
            f"cron {cron!r} has {len(fields)} field{'s' * (len(fields) != 1)}; it needs 5: "
            "minute, hour, day of month, month, day of week."
        )
    tz = zone(timezone)
    if isinstance(tz, str):
        return tz
    expression = " ".join(fields)
    try:
        first = next(CronSim(expression, datetime(2000, 1, 1)), None)
    except CronSimError as exc:
        return f"cron {cron!r} is not a cron expression: {str(exc).lower()}."
    if first is None:
        return f"cron {cron!r} never matches a date."
    return Rule(expression, tz)


def next_after(rule: Rule, after: datetime) -> datetime | None:
    """The rule's first occurrence strictly after `after` (UTC), or None when it has no more
    (within cronsim's 50 years)."""
    wall = _wall(after, rule.zone)
    first = next(CronSim(rule.cron, wall), None)
    if first is None:
        return None
    if _steady(wall, rule.zone) and _steady(first, rule.zone):
        # No change of clocks near `after` nor near the next local time: the local times in
        # between and around run in the same order as their instants.
        return _instant(first, rule.zone)
    # Near a change, a later local time can be an earlier instant: look at every local time
    # that could land after `after`, and take the earliest instant.
    best: tuple[datetime, datetime] | None = None
    for local in CronSim(rule.cron, wall - MAX_SHIFT):
        at = _instant(local, rule.zone)
        if at > after and (best is None or at < best[0]):
            best = (at, local)
        if best is not None and local > max(wall, best[1]) + MAX_SHIFT:
            break
    return best[0] if best else None


def local_label(at: datetime, zone: ZoneInfo) -> str:
    """An occurrence as people read it: its local date and time, in its zone."""
    return f"{at.astimezone(zone):%Y-%m-%d %H:%M} {zone.key}"


def _wall(at: datetime, zone: ZoneInfo) -> datetime:
    return at.astimezone(zone).replace(tzinfo=None)


def _steady(wall: datetime, zone: ZoneInfo) -> bool:
    """Whether the clocks of `zone` keep one offset from MAX_SHIFT before `wall` to after it."""
    return zone.utcoffset(wall - MAX_SHIFT) == zone.utcoffset(wall + MAX_SHIFT)


def _instant(local: datetime, zone: ZoneInfo) -> datetime:
    return local.replace(tzinfo=zone, fold=0).astimezone(UTC)
