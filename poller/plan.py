"""Planned send times: when each waiting message of a WhatsApp session is expected to go out.

A session's messages are planned one after another from its next free slot: each one takes its
typing pause, then a random pacing gap follows. Quiet hours and the daily cap move a slot to
when the session may send again. These are pure time computations; the store keeps the plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from poller.pacing import Pacing


@dataclass
class Slots:
    """A session's plan as it grows: the next free slot, and how many sends are planned (or
    were made) on the local day of that slot, for the daily cap. `why`: what moved a slot taken
    so far later than it would have been (the quiet hours, the cap), or None."""

    at: datetime
    day: str
    count: int
    why: str | None = None

    def take(self, pacing: Pacing, cap: int | None, text: str, lane: str = "") -> datetime:
        """The next slot for a message with `text`; the one after it becomes the next free."""
        at, why = allowed(pacing, self.at, cap, self, lane)
        self.why = why or self.why  # the slots after a pushed one wait for the same reason
        self.count += 1
        pause = pacing.typing_pause(text) if pacing.typing else 0.0
        self.at = at + timedelta(seconds=pause) + pacing.gap()
        return at


def allowed(
    pacing: Pacing, at: datetime, cap: int | None, slots: Slots | None = None, lane: str = ""
) -> tuple[datetime, str | None]:
    """The first time from `at` on that the session `lane` may send: after the quiet hours, and
    on a day whose cap is not reached (`slots` counts the sends planned on its day, and moves to
    the new day when the cap pushes the time on); with what moved it there, if anything."""
    why = None
    while True:
        quiet = pacing.quiet_until(at)
        if quiet is not None:
            at, why = quiet, quiet_reason(pacing, quiet)
            continue
        day = pacing.day(at).isoformat()
        if slots is not None and slots.day != day:
            slots.day, slots.count = day, 0
        if cap is not None and slots is not None and slots.count >= cap:
            at = pacing.next_day(at)
            why = cap_reason(pacing, lane, cap, at)
            continue
        return at, why


def quiet_reason(pacing: Pacing, until: datetime) -> str:
    return (
        f"Waiting for the end of the quiet hours ({pacing.describe_quiet()}) at "
        f"{until.astimezone(pacing.zone):%Y-%m-%d %H:%M}."
    )


def cap_reason(pacing: Pacing, lane: str, cap: int, until: datetime) -> str:
    return (
        f"Waiting: WhatsApp session '{lane}' sent its daily cap of {cap} message(s); it "
        f"sends again from {until.astimezone(pacing.zone):%Y-%m-%d %H:%M} ({pacing.zone.key})."
    )
