"""The process: `once` runs one tick (and the ones due within an interval); `run` runs ticks on
APScheduler's timer, brought forward when a message comes due, until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from loguru import logger
from pymongo.errors import PyMongoError

from poller import __version__, log, mongo_errors
from poller.breaker import Breakers
from poller.context import Memory
from poller.counts import TickCounts
from poller.events import EVENTS_PATH, Receiver
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.servers import Servers
from poller.settings import ConfigError, Settings
from poller.store import Store
from poller.tick import tick
from poller.watch import Watcher

# Early ticks start at least this long after the previous tick started: messages due a few
# milliseconds apart are claimed by one tick, not one tick each.
TICK_GAP = timedelta(milliseconds=100)


class Poller:
    """The collaborators one tick needs, opened once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.connect(settings)
        self.servers = Servers.from_settings(settings)
        # WAHA's failures carry over from one tick to the next, for this process's lifetime.
        self.breakers = Breakers(self.store.timings.retry)
        self.memory = Memory()
        self.pacing = Pacing.from_settings(settings)
        self.started_at = datetime.now(UTC)
        self.last_tick: tuple[datetime, TickCounts] | None = None
        self.tick_started: datetime | None = None
        self.last_beat: datetime | None = None
        self.metrics: Metrics | None = None  # run() sets it when HEALTH_PORT is set
        self.receiver: Receiver | None = None  # and this with EVENTS=webhook

    def start(self) -> None:
        """Reach MongoDB and create the indexes; raises PyMongoError when MongoDB is unusable."""
        self.store.ensure_indexes()
        logger.info(
            "poller {} instance {}: database {}, WAHA {}",
            __version__,
            self.store.owner,
            self.settings.mongodb_db,
            ", ".join(
                f"{s.name} {s.url}" if self.settings.waha_servers else s.url
                for s in self.settings.servers
            ),
        )

    def tick(self, stop: threading.Event | None = None) -> TickCounts:
        began = time.monotonic()
        self.tick_started = datetime.now(UTC)
        try:
            counts = tick(
                self.store,
                self.servers,
                self.settings.batch_size,
                stop=stop,
                breakers=self.breakers,
                pacing=self.pacing,
                memory=self.memory,
            )
        finally:
            self.tick_started = None
        if self.receiver is not None:  # once a tick, however many acks came in
            pending = self.receiver.drain()
            try:
                self.store.campaigns.count_receipts(pending)
            except PyMongoError as exc:
                self.receiver.again(pending)
                logger.warning("receipts counted at the next tick: {}", self.mongo_error(exc))
        self.last_tick = (datetime.now(UTC), counts)
        busy = any(v for k, v in counts.totals().items() if k != "key_rejected")
        (logger.info if busy else logger.debug)("tick: {}", counts.summary())
        if self.metrics:
            try:
                due = self.store.plans.count_due(self.last_tick[0])
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
            if counts.next_at is None or counts.next_at > until or self.refused(counts):
                return total
            wake = max(counts.next_at, started + TICK_GAP)
            if stop.wait(max(0.0, (wake - datetime.now(UTC)).total_seconds())):
                return total

    def refused(self, counts: TickCounts) -> bool:
        """WAHA refused this poller's settings for every server (its key, or its URL)."""
        return counts.key_rejected or self.servers.refused()

    def mongo_error(self, exc: PyMongoError) -> str:
        """A MongoDB error in one line: its host(s), what failed, how long this waited."""
        return mongo_errors.describe(exc, self.settings.mongodb_timeout_seconds)

    def heartbeat(self) -> None:
        """Tell the web app, `poller check` and `poller status` that this process is alive.
        Only MongoDB is asked: a hung WAHA never delays it (WAHA's sessions are the last
        tick's list)."""
        last_at, last_counts = self.last_tick or (None, None)
        now = datetime.now(UTC)
        self.store.heartbeats.beat(
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
                # Each WAHA server: reachable, key accepted, breaker, its sessions.
                "wahaServers": last_counts.servers if last_counts else None,
                # Every server's sessions in one list (None when none could be listed).
                "wahaSessions": _sessions(last_counts.servers) if last_counts else None,
                "tickRunningSince": self.tick_started,
                # WAHA's event posts refused in the last hour, by reason (EVENTS=webhook).
                "eventsRefused": self.receiver.refusals.last_hour(now) if self.receiver else None,
            },
            now,
        )
        self.last_beat = now

    def ticking(self, now: datetime) -> bool:
        """A tick is running, or one completed recently (two intervals and a minute of slack)."""
        if self.tick_started is not None:
            return True
        last = self.last_tick[0] if self.last_tick else self.started_at
        slack = 2 * self.store.timings.tick_interval + timedelta(seconds=60)
        return now - last <= slack

    def healthy(self) -> bool:
        """What /healthz answers: heartbeats are being written and ticks are completing."""
        now = datetime.now(UTC)
        max_age = self.store.timings.heartbeat_max_age
        beating = self.last_beat is not None and now - self.last_beat <= max_age
        return beating and self.ticking(now)

    def close(self) -> None:
        self.servers.close()
        self.store.close()


def _sessions(servers: list[dict[str, Any]]) -> list[dict[str, str]] | None:
    listed = [s["sessions"] for s in servers if s["sessions"] is not None]
    return [session for sessions in listed for session in sessions] if listed else None


def once(settings: Settings) -> int:
    """One tick, and one more for each message or paced turn that comes due within
    POLL_INTERVAL_SECONDS. 0 when it ran; 1 when MongoDB is unreachable or WAHA refused the
    API key, or serves no route under its URL (a WAHA_URL ending in /api)."""
    with Stop() as stop:
        poller = _open(settings, "MongoDB is unavailable")
        if poller is None:
            return 1
        until = datetime.now(UTC) + timedelta(seconds=settings.poll_interval_seconds)
        try:
            counts = poller.ticks_until(until, stop)
        except PyMongoError as exc:
            logger.error("MongoDB is unavailable: {}", poller.mongo_error(exc))
            return 1
        finally:
            poller.close()
        return 1 if poller.refused(counts) else 0


def run_once(env: Mapping[str, str] | None = None) -> dict[str, int | bool]:
    """One tick from Python, for serverless handlers: settings from `env` or os.environ.

    Returns the tick's counts. Raises ConfigError for bad settings (a WAHA URL under which WAHA
    serves no route too), PyMongoError when MongoDB is unreachable and PermissionError when WAHA
    refuses the key, so that the platform records a failed invocation.
    """
    settings = Settings.from_env(env)
    if not _logging_set_up.is_set():  # once per process: a warm serverless instance calls again
        log.setup(settings.log_level, settings.log_json, settings.secrets)
        for warning in settings.warnings:
            logger.warning(warning)
        _logging_set_up.set()
    poller = Poller(settings)
    try:
        poller.start()
        counts = poller.tick()
    finally:
        poller.close()
    wrong = [poller.servers.states[name]["problem"] for name in sorted(poller.servers.wrong_url)]
    if poller.refused(counts) and wrong:
        raise ConfigError("; ".join(wrong))
    if poller.refused(counts):
        keys = ", ".join(sorted({s.key_variable for s in settings.servers}))
        raise PermissionError(f"WAHA rejected the API key (check {keys})")
    return counts.totals()


_logging_set_up = threading.Event()


def run(settings: Settings) -> int:
    """Tick every POLL_INTERVAL_SECONDS, and when a message comes due, until SIGTERM/SIGINT;
    0 after a clean stop."""
    with Stop() as stop:
        poller = _open(settings, "crashed: MongoDB is unavailable at start-up")
        if poller is None:
            return 1
        server = None
        if settings.health_port:
            poller.metrics = Metrics()
            address = f"{settings.health_host}:{settings.health_port}"
            if settings.events == "webhook":
                poller.receiver = Receiver(
                    poller.store,
                    settings.webhook_hmac_key,
                    settings.webhook_secret,
                    settings.webhook_max_bytes,
                    frozenset(settings.optout_keywords),
                    frozenset(settings.optin_keywords),
                    settings.optout_reply,
                    poller.servers.phone_of,
                )
            dashboard = None
            if settings.dashboard_token:
                from poller.dashboard import Dashboard  # imported only when it is on

                dashboard = Dashboard(poller.store, poller.pacing, settings.dashboard_token)
            try:
                server = poller.metrics.serve(
                    settings.health_host,
                    settings.health_port,
                    poller.healthy,
                    poller.receiver,
                    dashboard,
                )
            except OSError as exc:
                logger.error("crashed: cannot serve metrics on {}: {}", address, exc)
                poller.close()
                return 1
            logger.info("metrics on http://{}/metrics", address)
            if poller.receiver is not None:
                logger.info("WAHA events on http://{}{}", address, EVENTS_PATH)
            if dashboard is not None:
                logger.info("dashboard on http://{}/", address)

        scheduler = BackgroundScheduler(timezone=UTC)
        wakeup = Wakeup(scheduler, "tick")
        add_jobs(
            scheduler,
            wakeup,
            lambda: _tick(poller, stop),
            lambda: _heartbeat(poller),
            settings.poll_interval_seconds,
            settings.heartbeat_seconds,
        )
        scheduler.start()
        logger.info(
            "running: a tick every {:g} s, and when a message is due",
            settings.poll_interval_seconds,
        )
        watcher = Watcher(poller.store, wakeup.ask, stop)
        watcher.start()

        stop.wait()
        wakeup.close()  # waits for the tick in progress: it finishes the message in flight
        scheduler.shutdown(wait=True)
        # It sees `stop` within a second, or once its read gives up while MongoDB is unreachable.
        watcher.join(timeout=settings.mongodb_timeout_seconds + 2)
        if server is not None:
            server.shutdown()  # the requests in progress finish; every connection is closed
        try:
            # The web app sees "stopped" at once, not after the heartbeat's TTL.
            poller.store.heartbeats.remove()
        except PyMongoError as exc:
            logger.warning("heartbeat not removed: {}", poller.mongo_error(exc))
        poller.close()
        logger.info("stopped")
        return 0


def add_jobs(
    scheduler: BaseScheduler,
    wakeup: Wakeup,
    tick: Callable[[], datetime | None],
    heartbeat: Callable[[], None],
    tick_seconds: float,
    heartbeat_seconds: float,
) -> None:
    """The two jobs of `poller run`, each at once and then on its interval. A tick brought
    forward while one runs (a wake-up that raced the scheduler's own run) is a second
    instance, which waits for the first (`Wakeup.run`): never skipped, never overlapping. Two
    heartbeats never run at once."""
    jobs: list[tuple[Callable[[], None], str, float, int]] = [
        (lambda: wakeup.run(tick), "tick", tick_seconds, 2),
        (heartbeat, "heartbeat", heartbeat_seconds, 1),
    ]
    for job, job_id, seconds, instances in jobs:
        scheduler.add_job(
            job,
            "interval",
            id=job_id,
            seconds=seconds,
            next_run_time=datetime.now(UTC),
            max_instances=instances,
            coalesce=True,  # after a long tick, run once, not once per missed interval
            misfire_grace_time=None,
        )


def _tick(poller: Poller, stop: threading.Event) -> datetime | None:
    """One tick of `poller run`; when to tick next, if before the timer."""
    if stop.is_set():
        return None
    try:
        return poller.tick(stop).next_at
    except PyMongoError as exc:
        logger.error("tick skipped, MongoDB is unavailable: {}", poller.mongo_error(exc))
    except Exception:
        logger.exception("tick failed unexpectedly; the next tick will try again")
    return None


def _heartbeat(poller: Poller) -> None:
    try:
        poller.heartbeat()
    except PyMongoError as exc:
        logger.warning("heartbeat not written, MongoDB is unavailable: {}", poller.mongo_error(exc))


class Wakeup:
    """Brings the scheduler's next tick forward: to when the last tick says the next message
    comes due, or when the watcher sees a message written meanwhile.

    A tick is not moved while one runs: what is asked for meanwhile, and the tick's own next
    time, are kept, and moved to once the scheduler reports the run over (`finished`, an
    APScheduler listener). A wake-up that lands after the scheduler started a run but before
    `run` began is moved to at once: the scheduler then starts a second instance, which waits
    in `run` for the first (`add_jobs` allows two), so that it is never skipped. `close` waits
    for the tick in progress; after it, nothing moves the job any more, so that the
    scheduler's shutdown never waits for a tick that waits for the scheduler.
    """

    def __init__(self, scheduler: BaseScheduler, job_id: str) -> None:
        self._scheduler = scheduler
        self._job_id = job_id
        self._lock = threading.Condition()
        self._running = 0  # runs of the job not yet reported over
        self._closed = False
        # Ticks of one process never overlap: a run the scheduler starts while one runs waits.
        self._one_at_a_time = threading.Lock()
        self._asked: datetime | None = None
        self._last_start = datetime.now(UTC)
        scheduler.add_listener(self.finished, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def ask(self, at: datetime) -> None:
        """Tick at `at` at the latest (from any thread)."""
        with self._lock:
            if self._running:
                self._asked = min(self._asked or at, at)
            elif not self._closed:
                self._move(at)

    def run(self, work: Callable[[], datetime | None]) -> None:
        """Run one tick (`work`, which returns when it wants the next), as the scheduler's job."""
        with self._lock:
            if self._closed:
                return
            self._running += 1
            self._last_start = datetime.now(UTC)
        next_at = None
        try:
            with self._one_at_a_time:
                next_at = work()
        finally:
            if next_at is not None:
                self.ask(next_at)  # kept: `_running` holds until the scheduler reports the end

    def finished(self, event: JobExecutionEvent) -> None:
        """The scheduler's report that a run of a job returned: for ours, move to what was
        asked for while it ran."""
        if event.job_id != self._job_id:
            return
        with self._lock:
            self._running = max(0, self._running - 1)
            if self._asked is not None and not self._closed and not self._running:
                self._move(self._asked)
                self._asked = None
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: not self._running)

    def _move(self, at: datetime) -> None:
        # Not before the last tick started plus the gap, and a moment from now at the earliest.
        at = max(at, self._last_start + TICK_GAP, datetime.now(UTC) + timedelta(milliseconds=50))
        job = self._scheduler.get_job(self._job_id)
        if job is not None and job.next_run_time is not None and at < job.next_run_time:
            self._scheduler.modify_job(self._job_id, next_run_time=at)


class Stop(threading.Event):
    """Set when SIGTERM (systemd, Docker) or SIGINT (PM2, Ctrl-C) arrives.

    The signal handlers only note the signal (`signal`): setting an Event or logging from a
    handler can deadlock with the code it interrupted. The interpreter also writes the signal's
    number to a pipe (`signal.set_wakeup_fd`), and a thread reading it sets the event and logs.
    Used as a context manager, it puts the previous handlers back on exit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signal: str | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous: list[Any] = []

    def __enter__(self) -> Stop:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous.append((signum, signal.signal(signum, self._note)))
        self._previous.append(signal.set_wakeup_fd(self._write, warn_on_full_buffer=False))
        threading.Thread(target=self._relay, name="signals", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous.pop())
        for signum, handler in self._previous:
            signal.signal(signum, handler)
        os.close(self._write)  # the relay thread reads the end of the pipe and returns

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name

    def _relay(self) -> None:
        try:
            while got := os.read(self._read, 1):  # empty once the pipe is closed
                if got[0] in (signal.SIGTERM, signal.SIGINT):  # not another handler's signal
                    name = signal.Signals(got[0]).name
                    logger.info("received {}: finishing the message in flight", name)
                    self.set()
        finally:
            os.close(self._read)


def _open(settings: Settings, failure: str) -> Poller | None:
    """A started Poller, or None after logging why MongoDB cannot be used."""
    try:
        poller = Poller(settings)  # a mongodb+srv:// name is resolved here
    except PyMongoError as exc:
        logger.error(
            "{}: {}", failure, mongo_errors.describe(exc, settings.mongodb_timeout_seconds)
        )
        return None
    try:
        poller.start()
    except PyMongoError as exc:
        logger.error("{}: {}", failure, poller.mongo_error(exc))
        poller.close()
        return None
    return poller
