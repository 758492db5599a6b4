"""`poller` against the reference design (`reference.py`), on one MongoDB server and one WAHA
simulator; prints a table with both columns and their ratio.

    .venv/bin/python benchmarks/compare.py [--report docs/benchmarks.md] [--smoke]

Measures, pacing off, 20 WhatsApp sessions:

- throughput: messages sent per second while draining a backlog of `--messages` due messages,
  from the first claim to the last `sentAt`, with WAHA answering sendText at once and after
  200 ms. Each design runs as its own process (`reference.py`, `poller run`);
- lateness: `sentAt - scheduledAt` of messages inserted at random moments over `--feed`
  seconds, each due at a random point of the next `--horizon` seconds. Both designs run at the
  same time, each on its own database, fed the same messages;
- MongoDB round trips per sent message while draining a backlog, counted with pymongo's
  command monitoring;
- documents examined per claimed message by each design's claim query (`explain`
  executionStats), in a collection that also holds `--history` sent and future messages;
- peak RSS of each process (the kernel's high-water mark, over every phase) and its CPU while
  idle for `--idle` seconds.

MongoDB is MONGODB_TEST_URI when set, otherwise SecantusDB started as its own process (much
slower than mongod, above all on large collections: the throughput and lateness figures are
lower and upper bounds of what mongod gives). `--report` writes the table, the machine and the
versions into that Markdown file (between its `results` markers) and the lateness plot beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psutil
from loguru import logger
from pymongo import MongoClient, monitoring
from pymongo.collection import Collection
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

import reference  # noqa: E402
from soak import SETTING_PREFIXES  # noqa: E402

from poller.breaker import Breakers  # noqa: E402
from poller.pacing import Pacing  # noqa: E402
from poller.settings import Settings  # noqa: E402
from poller.store import Store  # noqa: E402
from poller.store.plans import NEW_INDEX, unplanned_query  # noqa: E402
from poller.testing.mongo import mongo_daemon  # noqa: E402
from poller.testing.waha import WahaSimulator  # noqa: E402
from poller.tick import tick  # noqa: E402
from poller.waha import WahaClient  # noqa: E402

Doc = dict[str, Any]

KEY = "bench-key"
SESSIONS = [f"s{n:02d}" for n in range(20)]
DESIGNS = ("reference", "poller")
HERE = Path(__file__).parent
console = Console(width=None if sys.stdout.isatty() else 120)


# -- the two designs as processes -----------------------------------------------------------------


class Process:
    """One design running as its own process, on database `db`; logs to `<folder>/<db>.log`."""

    started: list[subprocess.Popen[bytes]] = []  # every one, to kill those left after a failure

    def __init__(self, design: str, uri: str, db: str, waha: str, folder: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
        if design == "reference":
            command = [sys.executable, str(HERE / "reference.py"), uri, db, waha, KEY]
        else:
            command = [sys.executable, "-m", "poller", "run"]
            env.update(
                MONGODB_URI=uri,
                MONGODB_DB=db,
                WAHA_URL=waha,
                WAHA_API_KEY=KEY,
                POLLER_INSTANCE_ID=db,
                PACING_MIN_SECONDS="0",
                PACING_MAX_SECONDS="0",
            )
        self.log = (folder / f"{db}.log").open("wb")
        self.popen = subprocess.Popen(
            command, env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
        )
        self.ps = psutil.Process(self.popen.pid)
        Process.started.append(self.popen)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> float:
        """SIGTERM, and the process's peak RSS until then, in MiB.

        The peak is the kernel's high-water mark of the process's memory (Linux: VmHWM). Not
        getrusage(): its ru_maxrss starts from the size of the parent that forked it.
        """
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB
        self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(timeout=30)
        self.log.close()
        if code != 0:
            raise SystemExit(f"benchmark: {self.popen.args} exited {code}")
        return peak


@dataclass
class Figures:
    throughput: dict[float, float] = field(default_factory=dict)  # WAHA latency -> msg/s
    in_order: bool = True  # each session's messages reached WAHA in scheduledAt order
    lateness: list[float] = field(default_factory=list)
    round_trips: float = 0.0  # per sent message
    server_cpu: float = 0.0  # ms of MongoDB server CPU per message sent (the 200 ms run)
    claim_examined: float = 0.0  # documents examined per claimed message, the claim query
    peak_rss: float = 0.0  # MiB
    idle_cpu: float = 0.0  # % of one core


def message(n: int, due: datetime, tag: str) -> Doc:
    return {
        "scheduledAt": due,
        "session": SESSIONS[n % len(SESSIONS)],
        "chatId": f"{tag}{n:08d}@c.us",
        "content": f"Benchmark message {n}",
        "isPicked": False,
        "isSent": False,
        "isDeleted": False,
    }


def indexed(env: Bench, db: str) -> Collection[Doc]:
    """The messages collection of `db`, with the indexes poller makes: the reference gets them."""
    store = Store(env.client, Settings(mongodb_uri=env.uri, mongodb_db=db))
    store.ensure_indexes()
    return store.messages.collection


def wait_sent(messages: Collection[Doc], count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while messages.count_documents({"isSent": True}) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: {messages.full_name} not all sent in {timeout:g} s")
        time.sleep(0.2)


def throughput(design: str, latency: float, count: int, env: Bench, figures: Figures) -> None:
    """Drain `count` due messages; messages per second from the first claim to the last send."""
    db = f"bench_{design}_{int(latency * 1000)}ms"
    messages = indexed(env, db)
    tag = f"{DESIGNS.index(design) + 1}{int(latency * 1000):03d}"
    due = datetime.now(UTC) - timedelta(seconds=5)
    messages.insert_many([message(n, due + timedelta(milliseconds=n), tag) for n in range(count)])
    env.waha.latency = latency
    cpu = env.server_cpu()
    process = Process(design, env.uri, db, env.waha.url, env.folder)
    wait_sent(messages, count, timeout=60 + count * (latency + 0.1))
    figures.peak_rss = max(figures.peak_rss, process.stop())
    docs = list(messages.find({}, {"pickedAt": 1, "sentAt": 1}))
    began = min(d["pickedAt"] for d in docs)
    ended = max(d["sentAt"] for d in docs)
    figures.throughput[latency] = count / (ended - began).total_seconds()
    if latency:
        figures.server_cpu = 1000 * (env.server_cpu() - cpu) / count
    # The order WAHA received each session's messages in.
    order = [int(m.chat_id[4:12]) for m in env.waha.sent if m.chat_id.startswith(tag)]
    for session in SESSIONS:
        mine = [n for n in order if SESSIONS[n % len(SESSIONS)] == session]
        figures.in_order = figures.in_order and mine == sorted(mine)


def lateness(feed: float, horizon: float, rate: float, env: Bench, out: dict[str, Figures]) -> None:
    """Both designs at once, each on its own database, fed the same messages at random moments."""
    env.waha.latency = 0.0
    collections = {d: indexed(env, f"bench_{d}_late") for d in DESIGNS}
    processes = {
        d: Process(d, env.uri, f"bench_{d}_late", env.waha.url, env.folder) for d in DESIGNS
    }
    rng = random.Random(1)
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < feed:
        time.sleep(rng.expovariate(rate))
        due = datetime.now(UTC) + timedelta(seconds=rng.uniform(0, horizon))
        for d, collection in collections.items():
            collection.insert_one(message(n, due, f"{DESIGNS.index(d) + 5}000"))
        n += 1
    for d, collection in collections.items():
        wait_sent(collection, n, timeout=horizon + reference.INTERVAL + 30)
        out[d].peak_rss = max(out[d].peak_rss, processes[d].stop())
        out[d].lateness = [
            (m["sentAt"] - m["scheduledAt"]).total_seconds()
            for m in collection.find({}, {"sentAt": 1, "scheduledAt": 1})
        ]


def idle(seconds: float, env: Bench, out: dict[str, Figures]) -> None:
    """Both designs at once with nothing to send: CPU over `seconds`, after a 10 s warm-up."""
    processes = {
        d: Process(d, env.uri, f"bench_{d}_idle", env.waha.url, env.folder) for d in DESIGNS
    }
    time.sleep(10)
    before = {d: p.cpu_seconds() for d, p in processes.items()}
    time.sleep(seconds)
    for d, process in processes.items():
        out[d].idle_cpu = 100 * (process.cpu_seconds() - before[d]) / seconds
        out[d].peak_rss = max(out[d].peak_rss, process.stop())


# -- round trips and documents examined, in this process ------------------------------------------


class Commands(monitoring.CommandListener):
    """Counts the commands a client sends: its round trips to MongoDB."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the poller sends for sessions side by side
        self.round_trips = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name != "endSessions":  # sent once, when the client closes
            with self.lock:
                self.round_trips += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def history(messages: Collection[Doc], count: int) -> None:
    """`count` messages that are no longer or not yet due: half sent, half in the future."""
    now = datetime.now(UTC)
    for start in range(0, count, 10_000):
        batch = []
        for n in range(start, min(count, start + 10_000)):
            doc = message(n, now + timedelta(minutes=1 + n), "7000")
            if n % 2 == 0:
                doc.update(
                    scheduledAt=now - timedelta(minutes=3 + n),
                    isPicked=True,
                    isSent=True,
                    status="sent",
                    sentAt=now - timedelta(minutes=3 + n),
                )
            batch.append(doc)
        messages.insert_many(batch)


def round_trips(count: int, env: Bench, out: dict[str, Figures]) -> None:
    """Drain `count` due messages with each design in turn, in this process, counting commands."""
    env.waha.latency = 0.0
    for design in DESIGNS:
        commands = Commands()
        client: MongoClient[Doc] = MongoClient(env.uri, tz_aware=True, event_listeners=[commands])
        settings = Settings(
            mongodb_uri=env.uri,
            mongodb_db=f"bench_{design}_trips",
            waha_url=env.waha.url,
            waha_api_key=KEY,
        )
        store = Store(client, settings)
        store.ensure_indexes()
        due = datetime.now(UTC) - timedelta(seconds=5)
        tag = f"8{DESIGNS.index(design)}00"
        store.messages.collection.insert_many([message(n, due, tag) for n in range(count)])
        commands.round_trips = 0
        if design == "reference":
            with httpx.Client(base_url=env.waha.url, headers={"X-Api-Key": KEY}) as http:
                sent = reference.wake(store.messages.collection, http, threading.Event())
        else:
            sent = drain(store, WahaClient(env.waha.url, KEY, 30), settings.batch_size)
        if sent != count:
            raise SystemExit(f"benchmark: {design} sent {sent} of {count} (round trips)")
        out[design].round_trips = commands.round_trips / sent
        client.close()


def examined(count: int, rows: int, env: Bench, out: dict[str, Figures]) -> None:
    """`explain` of each design's claim query, `count` messages due among `rows` others."""
    # SecantusDB runs the claim's query by scanning the collection, whatever its plan: slow.
    settings = Settings(
        mongodb_uri=env.uri, mongodb_db="bench_examined", mongodb_timeout_seconds=300
    )
    store = Store.connect(settings)
    store.ensure_indexes()  # the reference design gets the poller's indexes too
    history(store.messages.collection, rows)
    due = datetime.now(UTC) - timedelta(seconds=5)
    store.messages.collection.insert_many([message(n, due, "8000") for n in range(count)])
    now = datetime.now(UTC)
    window = {"$gte": now - reference.LOOKBACK, "$lte": now}
    claims = {
        # find_one_and_update's query, as a find: the one document it picks
        "reference": store.messages.collection.find(
            {"isPicked": False, "scheduledAt": window}, limit=1
        ),
        # The first read of due messages: those not yet planned, a batch of them
        "poller": store.messages.collection.find(
            unplanned_query(now), {"_id": 1}, limit=settings.batch_size
        ).hint(NEW_INDEX),
    }
    for design, query in claims.items():
        stats = query.sort("scheduledAt", 1).explain()["executionStats"]
        out[design].claim_examined = stats["totalDocsExamined"] / max(1, stats["nReturned"])
    store.close()


def drain(store: Store, waha: WahaClient, batch_size: int) -> int:
    """Tick until a tick claims nothing; how many messages were sent."""
    sent = 0
    breakers = Breakers(store.timings.retry)
    while True:
        counts = tick(store, waha, batch_size, breakers=breakers, pacing=Pacing())
        sent += counts.sent
        if not counts.claimed:
            waha.close()
            return sent


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Bench:
    uri: str
    client: MongoClient[Doc]
    waha: WahaSimulator
    folder: Path
    server: psutil.Process | None  # None: MONGODB_TEST_URI, not started here

    def server_cpu(self) -> float:
        """CPU seconds the MongoDB server used so far (NaN when it was not started here)."""
        if self.server is None:
            return float("nan")
        times = self.server.cpu_times()
        return float(times.user + times.system)


@contextmanager
def mongodb() -> Iterator[tuple[str, psutil.Process | None]]:
    """The server's URI, and its process when it is started here (for its CPU time)."""
    if os.environ.get("MONGODB_TEST_URI"):
        yield os.environ["MONGODB_TEST_URI"], None
        return
    with mongo_daemon() as daemon:
        assert daemon.process is not None
        yield daemon.uri, psutil.Process(daemon.process.pid)


@contextmanager
def leftovers_killed() -> Iterator[None]:
    try:
        yield
    finally:
        for popen in Process.started:
            if popen.poll() is None:
                popen.kill()
                popen.wait()


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


ROWS: list[tuple[str, Callable[[Figures], float], str]] = [
    # label, figure, format
    ("throughput, WAHA 0 ms (msg/s)", lambda f: f.throughput[0.0], "{:.1f}"),
    ("throughput, WAHA 200 ms (msg/s)", lambda f: f.throughput[0.2], "{:.1f}"),
    ("lateness p50 (s)", lambda f: percentile(f.lateness, 50), "{:.3f}"),
    ("lateness p95 (s)", lambda f: percentile(f.lateness, 95), "{:.3f}"),
    ("lateness p99 (s)", lambda f: percentile(f.lateness, 99), "{:.3f}"),
    ("MongoDB round trips per sent message", lambda f: f.round_trips, "{:.2f}"),
    ("MongoDB server CPU per sent message (ms)", lambda f: f.server_cpu, "{:.1f}"),
    ("docs examined per claimed message, claim query", lambda f: f.claim_examined, "{:.2f}"),
    ("peak RSS (MiB)", lambda f: f.peak_rss, "{:.1f}"),
    ("CPU while idle (% of a core)", lambda f: f.idle_cpu, "{:.3f}"),
]


def table(out: dict[str, Figures]) -> list[tuple[str, str, str, str]]:
    rows = []
    for label, figure, fmt in ROWS:
        ref, ours = figure(out["reference"]), figure(out["poller"])
        if math.isnan(ref):  # not measured
            rows.append((label, "–", "–", "–"))
            continue
        ratio = f"{ours / ref:.3g}×" if ref else "–"
        rows.append((label, fmt.format(ref), fmt.format(ours), ratio))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200, help="backlog drained per run")
    parser.add_argument("--feed", type=float, default=120, help="seconds of inserts (lateness)")
    parser.add_argument("--horizon", type=float, default=120, help="due within this many seconds")
    parser.add_argument("--rate", type=float, default=1.5, help="inserts per second (lateness)")
    parser.add_argument("--history", type=int, default=200_000, help="sent and future messages")
    parser.add_argument("--idle", type=float, default=60, help="seconds idle for the CPU figure")
    parser.add_argument("--smoke", action="store_true", help="small sizes: checks that it runs")
    parser.add_argument("--report", type=Path, help="Markdown file to write the results into")
    args = parser.parse_args()
    logger.remove()  # the ticks run here for the round trips: their log is not the output
    if args.smoke:
        args.messages, args.feed, args.horizon, args.history, args.idle = 20, 5, 5, 300, 3
    out = {d: Figures() for d in DESIGNS}
    began = time.monotonic()
    folder = tempfile.mkdtemp(prefix="poller-bench-")
    console.print(f"logs in {folder}")
    with mongodb() as (uri, server), leftovers_killed():
        waha = WahaSimulator(api_key=KEY, sessions={s: "WORKING" for s in SESSIONS}).start()
        client: MongoClient[Doc] = MongoClient(uri, tz_aware=True)
        for name in client.list_database_names():
            if name.startswith("bench_"):
                client.drop_database(name)
        env = Bench(uri, client, waha, Path(folder), server)
        for latency in (0.0, 0.2):
            for design in DESIGNS:
                console.print(f"throughput: {design}, WAHA {latency * 1000:g} ms")
                throughput(design, latency, args.messages, env, out[design])
        console.print(f"lateness: {args.feed:g} s of inserts, due within {args.horizon:g} s")
        lateness(args.feed, args.horizon, args.rate, env, out)
        console.print("round trips")
        round_trips(args.messages, env, out)
        console.print(f"documents examined by the claim, {args.history} other messages")
        examined(args.messages, args.history, env, out)
        console.print(f"idle for {args.idle:g} s")
        idle(args.idle, env, out)
        waha.stop()
        client.close()
    # Every message of the run has a chat of its own.
    twice = sum(1 for n in Counter(m.chat_id for m in waha.sent).values() if n > 1)
    rows = table(out)
    shown = Table(title=f"poller against the reference design ({time.monotonic() - began:.0f} s)")
    for column in ("", "reference", "poller", "poller ÷ reference"):
        shown.add_column(column, justify="left" if not column else "right")
    for row in rows:
        shown.add_row(*row)
    console.print(shown)
    console.print(f"each session's messages sent in order: {out['poller'].in_order}")
    console.print(f"messages WAHA received twice: {twice}")
    if args.report:
        report(args, rows, out, twice)
    return 0 if out["poller"].in_order and twice == 0 else 1


def report(
    args: argparse.Namespace,
    rows: list[tuple[str, str, str, str]],
    out: dict[str, Figures],
    twice: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = args.report.with_name("lateness.png")
    server = (
        "MONGODB_TEST_URI"
        if os.environ.get("MONGODB_TEST_URI")
        else f"SecantusDB {version('SecantusDB')}, as its own process"
    )
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for design in DESIGNS:
        values = sorted(out[design].lateness)
        share = [(i + 1) / len(values) for i in range(len(values))]
        axes.step(values, share, where="post", label=design)
    axes.set_xscale("log")
    axes.set_xlabel("lateness: sentAt − scheduledAt (s, log scale)")
    axes.set_ylabel("share of messages sent by then")
    axes.set_title("Lateness of messages due at random moments (pacing off)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(plot, dpi=100)
    lines = [
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {platform.platform()}, "
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GB; Python "
        f"{platform.python_version()}, pymongo {version('pymongo')}, "
        f"MongoDB: {server}.",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}`: {args.messages} messages per "
        f"throughput run, {len(out['poller'].lateness)} messages for lateness, {args.history} "
        f"other messages in the examined collection, {args.idle:g} s idle.",
        "",
        "| | reference | poller | poller ÷ reference |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"Each session's messages reached WAHA in `scheduledAt` order: {out['poller'].in_order}. "
        f"Messages WAHA received twice: {twice}.",
        "",
        f"![Lateness of both designs]({plot.name})",
    ]
    text = args.report.read_text()
    start, end = "<!-- results -->", "<!-- /results -->"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    args.report.write_text(f"{head}{start}\n{chr(10).join(lines)}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
