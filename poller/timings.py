"""Every duration the poller works with, derived once from the settings.

The store, the tick and the daemon read these; none of them derives a timing of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from poller.settings import Settings

# A retry's wait doubles this many times at most: up to 8 × RETRY_SECONDS, however many
# attempts failed before.
RETRY_DOUBLINGS = 3


@dataclass(frozen=True)
class Timings:
    # A message is never claimed nor sent more than this after its planned time (without pacing,
    # its scheduledAt): its deadline. One first seen later than that expires at once.
    lookback: timedelta
    # How long a claim stays valid without renewal.
    lease: timedelta
    # The first retry's wait; later ones back off from it (`retry_delay`).
    retry: timedelta
    # How long a MongoDB command may take before it gives up.
    mongodb_timeout: timedelta
    # Between two regular ticks.
    tick_interval: timedelta
    # How often `poller run` writes its heartbeat, and how long a heartbeat says it is alive.
    heartbeat: timedelta
    heartbeat_max_age: timedelta
    # A send holds its lease for the HTTP request and the write of its outcome, with slack.
    send_lease: timedelta
    # A session's turn lasts through the steps before the send (a message id, typing); just
    # before the send it is renewed for the send itself and the longest gap (`fence_hold`).
    # A poller that dies holding it blocks the session no longer than that.
    turn_hold: timedelta
    fence_hold: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Timings:
        seconds = _seconds
        lookback = seconds(settings.lookback_seconds)
        lease = seconds(settings.lease_seconds)
        send_lease = seconds(settings.waha_timeout_seconds + settings.mongodb_timeout_seconds + 5)
        pacing_max = seconds(settings.pacing_max_seconds)
        # Two WAHA calls (a message id, a chat action) and the typing pause, with slack.
        before_send = 2 * settings.waha_timeout_seconds + 15 + settings.typing_max_seconds
        return cls(
            lookback=lookback,
            lease=lease,
            retry=seconds(settings.retry_seconds),
            mongodb_timeout=seconds(settings.mongodb_timeout_seconds),
            tick_interval=seconds(settings.poll_interval_seconds),
            heartbeat=seconds(settings.heartbeat_seconds),
            heartbeat_max_age=3 * seconds(settings.heartbeat_seconds),
            send_lease=send_lease,
            turn_hold=seconds(before_send) + pacing_max,
            fence_hold=send_lease + pacing_max,
        )

    def retry_delay(self, attempts: int) -> timedelta:
        """The wait before the next try of a message that failed `attempts` times in a row:
        RETRY_SECONDS, doubled per attempt up to RETRY_DOUBLINGS times, then drawn at
        random from its upper half so that many messages retried together spread out.

        The wait never makes a message late: it expires, as always, once its planned time is
        more than the lookback window behind."""
        factor = 1 << min(max(attempts - 1, 0), RETRY_DOUBLINGS)
        return self.retry * factor * random.uniform(0.5, 1.0)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
