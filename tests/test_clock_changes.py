"""Changes of clocks: quiet hours, the pacing day and cron occurrences, computed on instants.

Each kind of zone: an ordinary change at 01:00 (Europe/London, 2026), a change at midnight
(America/Santiago, 2026: back from 24:00 to 23:00 on Saturday 4 April, on from 00:00 to 01:00
on Sunday 6 September), a change back over midnight (America/St_Johns, 2010: from 00:01 on
Sunday back to 23:01 on Saturday), a 30-minute change (Australia/Lord_Howe, 2026, at 02:00) and
none (Asia/Kolkata). The properties draw instants from the zone's year and from the hours
around its changes, where the defects are.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st
from support import POLLER

from poller import cron
from poller.pacing import Pacing
from poller.settings import ConfigError, Settings


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# Each zone's year under test, and its changes of clocks in that year (UTC).
YEARS = {
    "Europe/London": (2026, [utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)]),
    "America/Santiago": (2026, [utc(2026, 4, 5, 3), utc(2026, 9, 6, 4)]),
    "America/St_Johns": (2010, [utc(2010, 3, 14, 3, 31), utc(2010, 11, 7, 2, 31)]),
    "Australia/Lord_Howe": (2026, [utc(2026, 4, 4, 15), utc(2026, 10, 3, 15, 30)]),
    "Asia/Kolkata": (2026, []),
}
ZONES = list(YEARS)
NEAR = timedelta(hours=6)  # how close to a change the drawn instants come
MICROSECOND = timedelta(microseconds=1)


def instants(zone: str) -> st.SearchStrategy[datetime]:
    """An instant of the zone's year, or one within NEAR of one of its changes, to the second."""
    year, changes = YEARS[zone]
    start, near = utc(year, 1, 1), int(NEAR.total_seconds())
    found = st.integers(0, 365 * 86400).map(lambda s: start + timedelta(seconds=s))
    for change in changes:
        found |= st.integers(-near, near).map(lambda s, c=change: c + timedelta(seconds=s))  # type: ignore[misc]
    return found


def minutes_near_changes(zone: str) -> list[datetime]:
    """Every minute within NEAR of the zone's changes (of 1 January when it has none)."""
    year, changes = YEARS[zone]
    steps = range(-int(NEAR / timedelta(minutes=1)), int(NEAR / timedelta(minutes=1)) + 1)
    return [at + timedelta(minutes=n) for at in changes or [utc(year, 1, 1)] for n in steps]


def test_the_changes_are_where_the_tests_look() -> None:
    for zone, (_, changes) in YEARS.items():
        tz = ZoneInfo(zone)
        for at in changes:
            before, after = (at - timedelta(seconds=1)).astimezone(tz), at.astimezone(tz)
            assert before.utcoffset() != after.utcoffset(), (zone, at)


# -- quiet hours ----------------------------------------------------------------------------------

LONDON = ZoneInfo("Europe/London")


def test_quiet_hours_that_end_in_the_repeated_hour_end_after_now() -> None:
    """London goes back from 02:00 BST to 01:00 GMT on 25 October 2026: 01:10 happens twice,
    and each time the quiet hours end at the 01:30 that follows it."""
    night = Pacing(zone=LONDON, quiet_hours=(time(22), time(1, 30)))
    assert night.quiet_until(utc(2026, 10, 25, 0, 10)) == utc(2026, 10, 25, 0, 30)  # BST
    assert night.quiet_until(utc(2026, 10, 25, 0, 40)) is None  # 01:40 BST
    assert night.quiet_until(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 25, 1, 30)  # GMT
    # Santiago goes back from 24:00 to 23:00 on Saturday 4 April 2026: 23:10 happens twice.
    santiago = Pacing(zone=ZoneInfo("America/Santiago"), quiet_hours=(time(22), time(23, 30)))
    assert santiago.quiet_until(utc(2026, 4, 5, 2, 10)) == utc(2026, 4, 5, 2, 30)  # -03
    assert santiago.quiet_until(utc(2026, 4, 5, 3, 10)) == utc(2026, 4, 5, 3, 30)  # -04


def test_quiet_hours_that_begin_in_the_repeated_hour_stop_when_the_clock_goes_back() -> None:
    """The clock reads 01:00 to 01:30 again after 01:59 BST: outside 01:30-03:00, until it
    reads 01:30 again."""
    pacing = Pacing(zone=LONDON, quiet_hours=(time(1, 30), time(3)))
    assert pacing.quiet_until(utc(2026, 10, 25, 0, 40)) == utc(2026, 10, 25, 1)  # 01:40 BST
    assert pacing.quiet_until(utc(2026, 10, 25, 1, 10)) is None  # 01:10 GMT
    assert pacing.quiet_until(utc(2026, 10, 25, 1, 40)) == utc(2026, 10, 25, 3)  # 01:40 GMT


def test_quiet_hours_that_end_in_the_skipped_hour_end_at_the_change() -> None:
    """London skips from 01:00 GMT to 02:00 BST on 29 March 2026: quiet hours that end at
    01:30, 01:59 or 02:00 all end when the clock passes their end, at 02:00 BST."""
    now = utc(2026, 3, 29, 0, 50)
    ends = {}
    for end in (time(0, 59), time(1), time(1, 30), time(1, 59), time(2), time(2, 30)):
        ends[end] = Pacing(zone=LONDON, quiet_hours=(time(22), end)).quiet_until(now)
    change = utc(2026, 3, 29, 1)
    assert ends == {
        time(0, 59): utc(2026, 3, 29, 0, 59),
        time(1): change,
        time(1, 30): change,
        time(1, 59): change,
        time(2): change,
        time(2, 30): utc(2026, 3, 29, 1, 30),
    }
    # Quiet hours that begin in the skipped hour have begun when the clock passes it.
    evening = Pacing(zone=LONDON, quiet_hours=(time(1, 30), time(1)))
    assert evening.quiet_until(change) == utc(2026, 3, 30)  # 01:00 BST on the next day


quiet_times = st.sampled_from(
    [time(0), time(0, 1), time(0, 30), time(1), time(1, 30), time(1, 45), time(2), time(23)]
) | st.builds(time, st.integers(0, 23), st.integers(0, 59))


@pytest.mark.parametrize("zone", ZONES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_quiet_hours_last_from_now_to_an_instant_outside_them(
    zone: str, data: st.DataObject
) -> None:
    start, end = data.draw(quiet_times), data.draw(quiet_times)
    if start == end:
        return
    pacing = Pacing(zone=ZoneInfo(zone), quiet_hours=(start, end))
    now = data.draw(instants(zone))
    until = pacing.quiet_until(now)
    if until is None:
        return
    assert until > now
    assert pacing.quiet_until(until) is None, "it ends outside the quiet hours"
    later = now + timedelta(
        microseconds=data.draw(st.integers(0, (until - now) // MICROSECOND - 1))
    )
    assert pacing.quiet_until(later) == until, "quiet all the way, and the same end"


# -- the pacing day -------------------------------------------------------------------------------


def test_the_day_goes_on_when_clocks_go_back_over_midnight() -> None:
    """St John's went back from 00:01 on Sunday 7 November 2010 to 23:01 on Saturday: the
    Sunday had begun, and stays."""
    pacing = Pacing(zone=ZoneInfo("America/St_Johns"))
    midnight = utc(2010, 11, 7, 2, 30)  # 00:00 NDT
    assert pacing.day(midnight - timedelta(seconds=1)) == date(2010, 11, 6)
    assert pacing.day(midnight) == date(2010, 11, 7)
    assert pacing.day(utc(2010, 11, 7, 2, 45)) == date(2010, 11, 7)  # 23:15 NST
    assert pacing.next_day(utc(2010, 11, 7, 2, 45)) == utc(2010, 11, 8, 3, 30)  # 00:00 NST
    assert pacing.next_day(midnight - timedelta(seconds=1)) == midnight


def test_a_day_that_ends_at_a_change_of_clocks() -> None:
    """Santiago, 2026: Saturday 4 April lasts 25 hours, Sunday 6 September begins at 01:00."""
    pacing = Pacing(zone=ZoneInfo("America/Santiago"))
    assert pacing.day(utc(2026, 4, 5, 3, 30)) == date(2026, 4, 4)  # 23:30 -04, the second
    assert pacing.next_day(utc(2026, 4, 5, 2, 30)) == utc(2026, 4, 5, 4)
    assert pacing.next_day(utc(2026, 4, 5, 3, 30)) == utc(2026, 4, 5, 4)
    assert pacing.next_day(utc(2026, 9, 5, 12)) == utc(2026, 9, 6, 4)  # 01:00 -03
    assert pacing.day(utc(2026, 9, 6, 4)) == date(2026, 9, 6)


def check_days(pacing: Pacing, now: datetime) -> None:
    tomorrow = pacing.next_day(now)
    assert tomorrow > now
    assert pacing.day(tomorrow) > pacing.day(now)
    assert pacing.day(tomorrow - MICROSECOND) == pacing.day(now), "the next day begins at next_day"


@pytest.mark.parametrize("zone", ZONES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_next_day_begins_after_now(zone: str, data: st.DataObject) -> None:
    check_days(Pacing(zone=ZoneInfo(zone)), data.draw(instants(zone)))


@pytest.mark.parametrize("zone", ZONES)
def test_the_day_never_goes_back(zone: str) -> None:
    pacing = Pacing(zone=ZoneInfo(zone))
    year, _ = YEARS[zone]
    hours = [utc(year, 1, 1) + timedelta(hours=n) for n in range(366 * 24)]
    times = sorted(hours + minutes_near_changes(zone))
    days = [pacing.day(at) for at in times]
    assert days == sorted(days)
    assert all(b - a <= timedelta(days=1) for a, b in pairwise(days)), "none skipped"
    for at in minutes_near_changes(zone):
        check_days(pacing, at)


# -- cron -----------------------------------------------------------------------------------------


def rule(expression: str, zone: str) -> cron.Rule:
    found = cron.parse(expression, zone)
    assert isinstance(found, cron.Rule), found
    return found


def labels(expression: str, zone: str, start: datetime, until: datetime) -> list[str]:
    """Each occurrence after `start` up to `until`, as local time with its UTC offset."""
    found, at, tz = [], start, ZoneInfo(zone)
    while (at := cron.next_after(rule(expression, zone), at)) is not None and at <= until:  # type: ignore[assignment]
        found.append(at.astimezone(tz).strftime("%m-%d %H:%M%z"))
    return found


def test_lord_howe_keeps_both_occurrences_on_its_30_minute_changes() -> None:
    """Lord Howe skips from 02:00 to 02:30 on 4 October 2026: 02:20 happens at 02:50, after
    02:40. It goes back from 02:00 to 01:30 on 5 April: 01:45 happens the first time only."""
    start, until = utc(2026, 10, 2, 12), utc(2026, 10, 5, 12)
    assert labels("20,40 2 * * *", "Australia/Lord_Howe", start, until) == [
        "10-03 02:20+1030",
        "10-03 02:40+1030",
        "10-04 02:40+1100",
        "10-04 02:50+1100",
        "10-05 02:20+1100",
        "10-05 02:40+1100",
    ]
    start, until = utc(2026, 4, 3, 12), utc(2026, 4, 5, 12)
    assert labels("20,40 2 * * *", "Australia/Lord_Howe", start, until) == [
        "04-04 02:20+1100",
        "04-04 02:40+1100",
        "04-05 02:20+1030",
        "04-05 02:40+1030",
    ]
    assert labels("45 1 * * *", "Australia/Lord_Howe", start, until) == [
        "04-04 01:45+1100",
        "04-05 01:45+1100",
    ]


def every_occurrence(
    expression: str, zone: str, start: datetime, until: datetime
) -> list[datetime]:
    """The rules of poller/cron.py by brute force: every local time the expression names, from
    `start` to `until` (local), read with fold=0 (a skipped time as late after the change as it
    would have been without it, a repeated time the first time), each instant once, in order."""
    tz, found = ZoneInfo(zone), set()
    for local in CronSim(expression, start):
        if local > until:
            break
        found.add(local.replace(tzinfo=tz).astimezone(UTC))
    return sorted(found)


RULES = ["20,40 2 * * *", "45 1 * * *", "*/10 0-3 * * *", "0,30 23 * * *", "15 0 * * *"]


@pytest.mark.parametrize("zone", ZONES)
def test_a_years_occurrences_are_every_local_time_once_in_order(zone: str) -> None:
    year, _ = YEARS[zone]
    start = utc(year, 1, 1)
    for expression in RULES:
        expected = every_occurrence(
            expression, zone, datetime(year, 1, 1) - timedelta(days=1), datetime(year + 1, 1, 3)
        )
        found, at, r = [], start, rule(expression, zone)
        while (at := cron.next_after(r, at)) < start + timedelta(days=366):  # type: ignore[assignment,operator]
            found.append(at)
        assert found == [t for t in expected if start < t < start + timedelta(days=366)], expression


@pytest.mark.parametrize("zone", ZONES)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_next_occurrence_is_the_first_after_any_instant(zone: str, data: st.DataObject) -> None:
    expression = data.draw(st.sampled_from([*RULES, "*/20 * * * *", "0 * * * *"]))
    after = data.draw(instants(zone))
    wall = after.astimezone(ZoneInfo(zone)).replace(tzinfo=None)
    expected = every_occurrence(
        expression, zone, wall - timedelta(days=1), wall + timedelta(days=2)
    )
    assert cron.next_after(rule(expression, zone), after) == min(t for t in expected if t > after)


# -- one parser of zone names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["US", "Europe", "Etc", "zone.tab", "Mars/Olympus", "../etc/passwd", "a\0b", "", " ", 5]
)
def test_a_name_that_is_no_zone_gets_a_reason(name: object) -> None:
    found = cron.zone(name)
    assert isinstance(found, str) and f"timezone {name!r} is not an IANA time zone" in found
    reason = cron.parse("0 9 * * 1", name)
    assert isinstance(reason, str) and "is not an IANA time zone" in reason


@pytest.mark.parametrize("name", ["Europe/London", " UTC ", "Asia/Kolkata"])
def test_a_zone_name_gives_its_zone(name: str) -> None:
    assert cron.zone(name) == ZoneInfo(name.strip())


@pytest.mark.parametrize("name", ["US", "Europe", "zone.tab"])
def test_a_timezone_setting_that_is_no_zone_names_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match=f"TIMEZONE must be an IANA time zone .*got '{name}'"):
        Settings.from_env({"MONGODB_URI": "mongodb://localhost/whatsapp", "TIMEZONE": name})


def test_timezone_us_in_dotenv_exits_2_naming_timezone(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MONGODB_URI=mongodb://localhost/whatsapp\nTIMEZONE=US\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGODB", "WAHA", "TIME"))}
    result = subprocess.run(
        [*POLLER, "once"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("poller: configuration error: TIMEZONE must be"), line
    assert "'US'" in line and "cannot read .env" not in line
