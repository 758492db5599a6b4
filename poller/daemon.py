"""The process: `once` runs one tick; `run` runs ticks on a timer until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger
from pymongo.errors import PyMongoError

from poller import __version__, log
from poller.metrics import Metrics
from poller.settings import Settings
from poller.store import Store
from poller.tick import TickCounts, tick
from poller.waha import WahaClient


class Poller:
    """The collaborators one tick needs, opened once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.connect(settings)
        self.waha = WahaClient(
            settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds
        )
        self.started_at = datetime.now(UTC)
        self.last_tick: tuple[datetime, TickCounts] | None = None
        self.last_beat: datetime | None = None
        self.metrics = Metrics() if settings.health_port else None

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
        counts = tick(self.store, self.waha, self.settings.batch_size, stop=stop)
        self.last_tick = (datetime.now(UTC), counts)
        if self.metrics:
            self.metrics.record(
                counts, time.monotonic() - began, self.store.count_due(now=self.last_tick[0])
            )
        logger.info("tick: {}", counts.summary())
        return counts

    def heartbeat(self) -> None:
        """Tell the web app, `poller check` and `poller status` that this process is alive."""
        last_at, last_counts = self.last_tick or (None, None)
        now = datetime.now(UTC)
        self.store.beat(
            {
                "instance": self.settings.instance_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": __version__,
                "startedAt": self.started_at,
                "lastSeenAt": now,
                "lastTickAt": last_at,
                "lastTick": last_counts.totals() if last_counts else None,
                # None when WAHA did not answer: nothing can be sent (README: "system down").
                "wahaSessions": self.waha.sessions(),
            }
        )
        self.last_beat = now

    def healthy(self) -> bool:
        """Alive as `poller check` sees it: a heartbeat written within the last three beats."""
        limit = self.store.heartbeat_max_age
        return self.last_beat is not None and datetime.now(UTC) - self.last_beat <= limit

    def close(self) -> None:
        self.waha.close()
        self.store.close()


def once(settings: Settings) -> int:
    """One tick. 0 when it ran; 1 when MongoDB is unreachable or WAHA refused the API key."""
    stop = _stop_on_signals()
    poller = _open(settings, "MongoDB is unavailable")
    if poller is None:
        return 1
    try:
        counts = poller.tick(stop)
    except PyMongoError as exc:
        logger.error("MongoDB is unavailable: {}", exc)
        return 1
    finally:
        poller.close()
    return 1 if counts.key_rejected else 0


def run_once(env: Mapping[str, str] | None = None) -> dict[str, int | bool]:
    """One tick from Python, for serverless handlers: settings from `env` or os.environ.

    Returns the tick's counts. Raises ConfigError for bad settings and PyMongoError when
    MongoDB is unreachable, so that the platform reports a failed invocation.
    """
    settings = Settings.from_env(env)
    log.setup(settings.log_level, settings.log_json, settings.secrets)
    poller = Poller(settings)
    try:
        poller.start()
        return poller.tick().totals()
    finally:
        poller.close()


def run(settings: Settings) -> int:
    """Tick every POLL_INTERVAL_SECONDS until SIGTERM/SIGINT; 0 after a clean stop."""
    stop = _stop_on_signals()
    poller = _open(settings, "crashed: MongoDB is unavailable at start-up")
    if poller is None:
        return 1
    server = None
    if poller.metrics and settings.health_port:
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
        try:
            poller.tick(stop)
        except PyMongoError as exc:
            logger.error("tick skipped, MongoDB is unavailable: {}", exc)
        except Exception:
            logger.exception("tick failed unexpectedly; the next tick will try again")

    def safe_heartbeat() -> None:
        try:
            poller.heartbeat()
        except PyMongoError as exc:
            logger.warning("heartbeat not written, MongoDB is unavailable: {}", exc)

    scheduler = BackgroundScheduler(timezone=UTC)
    for job, seconds in (
        (safe_tick, settings.poll_interval_seconds),
        (safe_heartbeat, settings.heartbeat_seconds),
    ):
        scheduler.add_job(
            job,
            "interval",
            seconds=seconds,
            next_run_time=datetime.now(UTC),
            max_instances=1,  # never two ticks (or two heartbeats) at once
            coalesce=True,  # after a long tick, run once, not once per missed interval
            misfire_grace_time=None,
        )
    scheduler.start()
    logger.info("running: a tick every {:g} s", settings.poll_interval_seconds)

    while not stop.wait(1.0):
        pass
    scheduler.shutdown(wait=True)  # waits for the tick in progress
    if server is not None:
        server.shutdown()
    try:
        poller.store.remove_beat()  # the web app sees "stopped" at once, not after the TTL
    except PyMongoError as exc:
        logger.warning("heartbeat not removed: {}", exc)
    poller.close()
    logger.info("stopped")
    return 0


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
