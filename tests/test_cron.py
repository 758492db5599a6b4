"""Cron rules on a local clock: crontab's meaning of each field, and the one rule for the times
a change of clocks skips or repeats (Europe/London and America/New_York, 2026)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from poller.cron import Rule, next_after, parse


def rule(cron: str, zone: str) -> Rule:
    found = parse(cron, zone)
    assert isinstance(found, Rule), found
    return found


def occurrences(cron: str, zone: str, start: datetime, until: datetime) -> list[str]:
    """Each occurrence from `start` to `until` (local), as local time with its UTC offset."""
    found, at, tz = [], start, ZoneInfo(zone)
    while (at := next_after(rule(cron, zone), at)) is not None and at <= until:  # type: ignore[assignment]
        found.append(at.astimezone(tz).strftime("%m-%d %H:%M%z"))
    return found


def local(zone: str, *parts: int) -> datetime:
    return datetime(*parts, tzinfo=ZoneInfo(zone)).astimezone(UTC)  # type: ignore[misc]


def test_day_of_week_is_crontabs_sunday_0_or_7_and_monday_1() -> None:
    sunday = local("Europe/London", 2026, 11, 29, 12)
    mondays = occurrences("0 9 * * 1", "Europe/London", sunday, sunday + timedelta(days=14))
    assert mondays == ["11-30 09:00+0000", "12-07 09:00+0000"]
    for sunday_field in ("0", "7", "SUN"):
        found = occurrences(f"0 9 * * {sunday_field}", "UTC", sunday, sunday + timedelta(days=8))
        assert found == ["12-06 09:00+0000"]


def test_a_restricted_day_of_month_and_day_of_week_match_either() -> None:
    start = local("UTC", 2026, 11, 29)
    found = occurrences("0 9 1 * 1", "UTC", start, start + timedelta(days=9))
    assert found == ["11-30 09:00+0000", "12-01 09:00+0000", "12-07 09:00+0000"]


def test_london_spring_forward_a_skipped_time_happens_an_hour_later_once() -> None:
    # 29 March 2026: London goes from 01:00 GMT to 02:00 BST.
    start = local("Europe/London", 2026, 3, 28, 12)
    daily = occurrences("30 1 * * *", "Europe/London", start, start + timedelta(days=2))
    assert daily == ["03-29 02:30+0100", "03-30 01:30+0100"]
    start = local("Europe/London", 2026, 3, 29, 0, 10)
    halves = occurrences("*/30 * * * *", "Europe/London", start, start + timedelta(hours=2))
    # 01:00 and 01:30 do not exist: they fall on 02:00 and 02:30 BST, which happen once each.
    assert halves == [
        "03-29 00:30+0000",
        "03-29 02:00+0100",
        "03-29 02:30+0100",
        "03-29 03:00+0100",
    ]


def test_london_fall_back_a_repeated_time_happens_the_first_time_only() -> None:
    # 25 October 2026: London goes from 02:00 BST back to 01:00 GMT.
    start = local("Europe/London", 2026, 10, 24, 12)
    daily = occurrences("30 1 * * *", "Europe/London", start, start + timedelta(days=2))
    assert daily == ["10-25 01:30+0100", "10-26 01:30+0000"]
    start = local("Europe/London", 2026, 10, 25, 0, 10)
    halves = occurrences("*/30 * * * *", "Europe/London", start, start + timedelta(hours=3))
    assert halves == [
        "10-25 00:30+0100",
        "10-25 01:00+0100",
        "10-25 01:30+0100",
        # 01:00 and 01:30 GMT are the same local times again: not repeated.
        "10-25 02:00+0000",
    ]


def test_new_york_2026_changes() -> None:
    # 8 March 2026: 02:00 EST becomes 03:00 EDT; 1 November 2026: 02:00 EDT becomes 01:00 EST.
    start = local("America/New_York", 2026, 3, 7, 12)
    spring = occurrences("30 2 * * *", "America/New_York", start, start + timedelta(days=2))
    assert spring == ["03-08 03:30-0400", "03-09 02:30-0400"]
    start = local("America/New_York", 2026, 10, 31, 12)
    fall = occurrences("30 1 * * *", "America/New_York", start, start + timedelta(days=2))
    assert fall == ["11-01 01:30-0400", "11-02 01:30-0500"]
    hourly = occurrences(
        "0 * * * *",
        "America/New_York",
        local("America/New_York", 2026, 11, 1),
        local("America/New_York", 2026, 11, 1, 4),
    )
    assert hourly == [
        "11-01 01:00-0400",
        "11-01 02:00-0500",
        "11-01 03:00-0500",
        "11-01 04:00-0500",
    ]


def test_every_occurrence_comes_once_and_in_order_through_a_whole_year() -> None:
    for zone in ("Europe/London", "America/New_York"):
        start = local(zone, 2026, 1, 1)
        times, at = [], start
        r = rule("*/20 * * * *", zone)
        while (at := next_after(r, at)) < start + timedelta(days=366):  # type: ignore[assignment,operator]
            times.append(at)
        assert times == sorted(set(times))
        walls = [t.astimezone(ZoneInfo(zone)).replace(tzinfo=None) for t in times]
        assert len(walls) == len(set(walls)), "a local time happens once"
        # Every 20 minutes of the 366 days, both ends left out, less the repeated hour's three:
        # the skipped hour's local times fall on those of the hour after, once each.
        assert len(times) == 366 * 72 - 1 - 3


@pytest.mark.parametrize(
    ("cron", "zone", "reason"),
    [
        (None, "UTC", "cron is missing"),
        ("0 9 * *", "UTC", "has 4 fields; it needs 5"),
        ("0 0 9 * * 1", "UTC", "has 6 fields; it needs 5"),
        ("0 25 * * *", "UTC", "is not a cron expression: bad hour"),
        ("0 9 * * 1", "Mars/Olympus", "not an IANA time zone"),
        ("0 9 * * 1", 5, "not an IANA time zone"),
        ("* * */20 * 1L", "UTC", "never matches a date"),
    ],
)
def test_a_rule_that_cannot_be_used_says_why(cron: object, zone: object, reason: str) -> None:
    found = parse(cron, zone)
    assert isinstance(found, str) and reason in found
