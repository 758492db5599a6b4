"""The process: `once` runs one tick; `run` runs ticks on a timer until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import FrameType

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger
from pymongo.errors import PyMongoError

from poller import __version__, log
from poller.breaker import Breakers
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.tick import TickCounts, tick
from poller.waha import WahaClient
from poller.watch import Alarm, Watcher


class Poller:
    """The collaborators one tick needs, opened once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.connect(settings)
        self.waha = WahaClient(
            settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds
        )
        # WAHA's failures carry over from one tick to the next, for this process's lifetime.
        self.breakers = Breakers(timedelta(seconds=settings.retry_seconds))
        self.pacing = Pacing.from_settings(settings)
        self.started_at = datetime.now(UTC)
        self.last_tick: tuple[datetime, TickCounts] | None = None
        self.tick_started: datetime | None = None
        self.last_beat: datetime | None = None
        self.metrics: Metrics | None = None  # run() sets it when HEALTH_PORT is set

    def start(self) -> None:
        """Reach MongoDB and create the indexes; raises PyMongoError when MongoDB is unusable."""
        self.store.ensure_indexes()
        logger.info(
            "poller {} instance {}: database {}, WAHA {}",
            __version__,
            self.store.owner,
            self.settings.mongodb_db,
            self.settings.waha_url,
        )

    def tick(self, stop: threading.Event | None = None) -> TickCounts:
        began = time.monotonic()
        self.tick_started = datetime.now(UTC)
        try:
            counts = tick(
                self.store,
                self.waha,
                self.settings.batch_size,
                stop=stop,
                breakers=self.breakers,
                pacing=self.pacing,
            )
        finally:
            self.tick_started = None
        self.last_tick = (datetime.now(UTC), counts)
        logger.info("tick: {}", counts.summary())
        if self.metrics:
            try:
                due = self.store.count_due(self.last_tick[0])
            except PyMongoError:
                due = -1  # the tick itself went through; only the backlog count is missing
            self.metrics.record(counts, time.monotonic() - began, due)
        return counts

    def ticks_until(self, until: datetime, stop: threading.Event) -> TickCounts:
        """Tick, then again whenever a message comes due or a paced session's turn comes,
        until `until`; the counts of all these ticks."""
        total = TickCounts()
        while True:
            started = datetime.now(UTC)
            counts = self.tick(stop)
            total.add(counts)
            if counts.next_at is None or counts.next_at > until or counts.key_rejected:
                return total
            wake = max(counts.next_at, started + TICK_GAP)
            if stop.wait(max(0.0, (wake - datetime.now(UTC)).total_seconds())):
                return total

    def heartbeat(self) -> None:
        """Tell the web app, `poller check` and `poller status` that this process is alive."""
        last_at, last_counts = self.last_tick or (None, None)
        sessions = self.waha.sessions()
        now = datetime.now(UTC)
        self.store.beat(
            {
                # False when ticks stopped completing: `poller check` then reports it down.
                "ticking": self.ticking(now),
                "instance": self.settings.instance_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": __version__,
                "startedAt": self.started_at,
                "lastTickAt": last_at,
                "lastTick": last_counts.totals() if last_counts else None,
                # None when WAHA did not answer: nothing can be sent (README: "system down").
                "wahaSessions": sessions if isinstance(sessions, list) else None,
                "tickRunningSince": self.tick_started,
            },
            now,
        )
        self.last_beat = now

    def ticking(self, now: datetime) -> bool:
        """A tick is running, or one completed recently (two intervals and a minute of slack)."""
        if self.tick_started is not None:
            return True
        last = self.last_tick[0] if self.last_tick else self.started_at
        slack = timedelta(seconds=2 * self.settings.poll_interval_seconds + 60)
        return now - last <= slack

    def healthy(self) -> bool:
        """What /healthz answers: heartbeats are being written and ticks are completing."""
        now = datetime.now(UTC)
        beating = (
            self.last_beat is not None and now - self.last_beat <= self.store.heartbeat_max_age
        )
        return beating and self.ticking(now)

    def close(self) -> None:
        self.waha.close()
        self.store.close()


def once(settings: Settings) -> int:
    """One tick, and one more for each message or paced turn that comes due within
    POLL_INTERVAL_SECONDS. 0 when it ran; 1 when MongoDB is unreachable or WAHA refused the
    API key."""
    stop = _stop_on_signals()
    poller = _open(settings, "MongoDB is unavailable")
    if poller is None:
        return 1
    until = datetime.now(UTC) + timedelta(seconds=settings.poll_interval_seconds)
    try:
        counts = poller.ticks_until(until, stop)
    except PyMongoError as exc:
        logger.error("MongoDB is unavailable: {}", exc)
        return 1
    finally:
        poller.close()
    return 1 if counts.key_rejected else 0


def run_once(env: Mapping[str, str] | None = None) -> dict[str, int | bool]:
    """One tick from Python, for serverless handlers: settings from `env` or os.environ.

    Returns the tick's counts. Raises ConfigError for bad settings, PyMongoError when MongoDB
    is unreachable and PermissionError when WAHA refuses the key, so that the platform records
    a failed invocation.
    """
    settings = Settings.from_env(env)
    if not _logging_set_up.is_set():  # once per process: a warm serverless instance calls again
        log.setup(settings.log_level, settings.log_json, settings.secrets)
        _logging_set_up.set()
    poller = Poller(settings)
    try:
        poller.start()
        counts = poller.tick()
    finally:
        poller.close()
    if counts.key_rejected:
        raise PermissionError("WAHA rejected the API key (check WAHA_API_KEY)")
    return counts.totals()


_logging_set_up = threading.Event()


def run(settings: Settings) -> int:
    """Tick every POLL_INTERVAL_SECONDS until SIGTERM/SIGINT; 0 after a clean stop."""
    stop = _stop_on_signals()
    poller = _open(settings, "crashed: MongoDB is unavailable at start-up")
    if poller is None:
        return 1
    server = None
    if settings.health_port:
        poller.metrics = Metrics()
        address = f"{settings.health_host}:{settings.health_port}"
        try:
            server = poller.metrics.serve(
                settings.health_host, settings.health_port, poller.healthy
            )
        except OSError as exc:
            logger.error("crashed: cannot serve metrics on {}: {}", address, exc)
            poller.close()
            return 1
        logger.info("metrics on http://{}/metrics", address)

    def safe_tick() -> None:
        if stop.is_set():
            return
        next_at = None
        last_start[0] = datetime.now(UTC)
        ticking.set()
        try:
            next_at = poller.tick(stop).next_at
        except PyMongoError as exc:
            logger.error("tick skipped, MongoDB is unavailable: {}", exc)
        except Exception:
            logger.exception("tick failed unexpectedly; the next tick will try again")
        finally:
            ticking.clear()
        if next_at is not None:
            alarm.ring(next_at)

    def safe_heartbeat() -> None:
        try:
            poller.heartbeat()
        except PyMongoError as exc:
            logger.warning("heartbeat not written, MongoDB is unavailable: {}", exc)

    # A tick (the next due message, a session's next turn) and the watcher (a message written
    # meanwhile) ring the alarm; this thread then brings the next tick forward.
    alarm = Alarm()
    ticking = threading.Event()
    last_start = [datetime.now(UTC)]
    early: list[datetime | None] = [None]  # when this thread last brought the tick forward to
    scheduler = BackgroundScheduler(timezone=UTC)
    for job, seconds in (
        (safe_tick, settings.poll_interval_seconds),
        (safe_heartbeat, settings.heartbeat_seconds),
    ):
        scheduler.add_job(
            job,
            "interval",
            id=job.__name__,
            seconds=seconds,
            next_run_time=datetime.now(UTC),
            max_instances=1,  # never two ticks (or two heartbeats) at once
            coalesce=True,  # after a long tick, run once, not once per missed interval
            misfire_grace_time=None,
        )

    def on_skipped(event: JobSubmissionEvent) -> None:
        # The early tick came while a tick was still running: ask again once that one ends.
        if event.job_id == "safe_tick" and early[0] in event.scheduled_run_times:
            alarm.ring(datetime.now(UTC))

    scheduler.add_listener(on_skipped, EVENT_JOB_MAX_INSTANCES)
    scheduler.start()
    logger.info(
        "running: a tick every {:g} s, and when a message is due", settings.poll_interval_seconds
    )
    watcher = Watcher(poller.store, alarm.ring, stop)
    watcher.start()

    # The scheduler is changed from this thread only: shutdown() holds its lock while it waits
    # for the tick in progress, which must not be the one to ask for it.
    pending: datetime | None = None
    while not stop.is_set():
        at = alarm.take(0.25)
        if at is not None:
            pending = min(pending, at) if pending else at
        if pending is not None and not ticking.is_set():
            early[0] = _tick_again_at(scheduler, max(pending, last_start[0] + TICK_GAP))
            pending = None
    scheduler.shutdown(wait=True)  # waits for the tick in progress
    # It sees `stop` within a second, or once its read gives up while MongoDB is unreachable.
    watcher.join(timeout=settings.mongodb_timeout_seconds + 2)
    if server is not None:
        server.shutdown()
        server.server_close()
    try:
        poller.store.remove_beat()  # the web app sees "stopped" at once, not after the TTL
    except PyMongoError as exc:
        logger.warning("heartbeat not removed: {}", exc)
    poller.close()
    logger.info("stopped")
    return 0


def _tick_again_at(scheduler: BackgroundScheduler, when: datetime) -> datetime | None:
    """Bring the next tick forward to `when` (a message due, a paced session's next turn);
    the time it was moved to, if it was."""
    job = scheduler.get_job("safe_tick")
    # A moment from now at the earliest: the last tick must have returned when the next starts.
    when = max(when, datetime.now(UTC) + timedelta(milliseconds=50))
    if job is None or job.next_run_time is None or when >= job.next_run_time:
        return None
    scheduler.modify_job("safe_tick", next_run_time=when)
    return when


# Early ticks start at least this long after the previous tick started: messages due a few
# milliseconds apart are claimed by one tick, not one tick each.
TICK_GAP = timedelta(milliseconds=250)


def _stop_on_signals() -> threading.Event:
    """SIGTERM (systemd, Docker) and SIGINT (PM2, Ctrl-C) set the returned flag, nothing more."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()  # the tick notices it between two messages
        logger.info("received {}: finishing the message in flight", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _open(settings: Settings, failure: str) -> Poller | None:
    """A started Poller, or None after logging why MongoDB cannot be used."""
    try:
        poller = Poller(settings)  # a mongodb+srv:// name is resolved here
    except PyMongoError as exc:
        logger.error("{}: {}", failure, exc)
        return None
    try:
        poller.start()
    except PyMongoError as exc:
        logger.error("{}: {}", failure, exc)
        poller.close()
        return None
    return poller
