"""Soak test: several `poller run` replicas deliver a steady stream of messages under faults.

    .venv/bin/python benchmarks/soak.py --minutes 0.5 [--replicas 3] [--rate 10] [--seed 1]

Starts SecantusDB as its own process (`poller.testing.mongo.mongo_daemon`), the WAHA simulator
(5 % of sendText answered with a 500, half of those after delivering) and `--replicas` daemons
ticking every second. A feeder inserts about `--rate` messages a second, each to its own chat,
due 0 to 5 s later, some through `sessionId` and some in a campaign. Meanwhile it injects, spread
over the run: a replica SIGKILLed while it sends or holds claims (the others take its claims
over once its lease ends; a replacement is started), WAHA down for 3 s, bursts of MongoDB
command failures, a MongoDB restart and a slow WAHA (2.5 s per send, above the 2 s timeout).
Then it stops feeding, waits up to 120 s for every message to end `sent`, `failed`, `expired` or
`unknown`, stops the replicas with SIGTERM and prints what happened.

Exit code 1 when a chat received a message twice or a message was lost (not settled at the end,
or marked `sent` although WAHA never received it), or when no replica could be killed with a
message in flight; 0 otherwise: every message WAHA received was received once, and every
message marked `sent` was received.

SecantusDB is much slower than mongod: lateness and drain times measured here are upper bounds
of what a real deployment sees. Everything listens on 127.0.0.1; the replicas' logs stay in the
temporary folder printed at start.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from bson import ObjectId
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError
from rich.console import Console
from rich.table import Table

from poller.contract import FINAL, SENT
from poller.testing.mongo import MongoDaemon, mongo_daemon
from poller.testing.waha import WahaSimulator

Doc = dict[str, Any]

DB = "soak"
KEY = "soak-key"
SESSIONS = ("s1", "s2", "s3")
DRAIN_SECONDS = 120.0  # at most this long after feeding stops for every message to settle
STOP_SECONDS = 15.0  # SIGTERM, then SIGKILL after this long
KILL_WAIT_SECONDS = 30.0  # at most this long for a replica with a message in flight to kill
REPLICA_ENV = {
    "POLL_INTERVAL_SECONDS": "1",
    "LEASE_SECONDS": "5",
    "RETRY_SECONDS": "2",
    "WAHA_TIMEOUT_SECONDS": "2",
    "MONGODB_TIMEOUT_SECONDS": "2",
    "HEARTBEAT_SECONDS": "2",
    # Faults, not pacing, are under test here: messages go out as fast as WAHA takes them.
    "PACING_MIN_SECONDS": "0",
    "PACING_MAX_SECONDS": "0",
}
# Settings of this process's environment that must not reach the replicas.
SETTING_PREFIXES = (
    "MONGODB",
    "WAHA",
    "LOG",
    "POLL",
    "LEASE",
    "RETRY",
    "LOOKBACK",
    "BATCH",
    "HEARTBEAT",
    "HEALTH",
    "MESSAGES_",
    "CAMPAIGNS_",
    "SESSIONS_",
    "PACING",
    "TYPING",
    "DAILY_CAP",
    "QUIET_HOURS",
    "TIMEZONE",
)

# Wide enough for the failure reasons when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 120)


# -- processes -----------------------------------------------------------------------------------


class Replicas:
    """The `poller run` processes r0, r1, ...; each logs to `<folder>/<name>.log`."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}
        self.killed: set[str] = set()

    def start(self) -> str:
        name = f"r{len(self.processes)}"
        log = (self.folder / f"{name}.log").open("wb")
        self.logs[name] = log
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "poller", "run"],
            env={**self.env, "POLLER_INSTANCE_ID": instance(name)},
            cwd=self.folder,  # no .env of the working tree is read
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        return name

    def running(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is None]

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()
        self.killed.add(name)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every process still running, SIGKILL after STOP_SECONDS; the exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes[name] = None  # did not stop in time
        for log in self.logs.values():
            log.close()
        return codes


def instance(replica: str) -> str:
    return f"soak-{replica}"


def campaign_at_once(sessions: list[str], per_session: int) -> list[dict[str, object]]:
    """`per_session` messages for each session, all due now: a campaign written at once."""
    now = datetime.now(UTC)
    return [
        {"scheduledAt": now, "session": s, "chatId": f"4477{n:08d}@c.us", "content": "Hi"}
        for n, s in enumerate(s for s in sessions for _ in range(per_session))
    ]


def replica_environment(daemon: MongoDaemon, waha: WahaSimulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.pop("POLLER_INSTANCE_ID", None)
    env.update(
        MONGODB_URI=daemon.uri,
        MONGODB_DB=DB,
        WAHA_URL=waha.url,
        WAHA_API_KEY=KEY,
        **REPLICA_ENV,
    )
    return env


def wait_for_heartbeats(db: Any, count: int, timeout: float = 120.0) -> None:
    """Until `count` replicas wrote a heartbeat: they are connected and ticking (a generous
    limit: starting Python processes on a busy machine is slow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(db["pollerheartbeats"].distinct("instance")) >= count:
            return
        time.sleep(0.2)
    raise SystemExit(f"soak: the replicas did not start within {timeout:g} s (see their logs)")


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Soak:
    daemon: MongoDaemon
    waha: WahaSimulator
    replicas: Replicas
    messages: Collection[Doc]
    rng: random.Random
    began: float = field(default_factory=time.monotonic)
    began_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Messages a fault caught in flight: _id -> what happened to them then.
    caught: dict[Any, str] = field(default_factory=dict)
    faults: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, what

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def note(self, start: float, what: str) -> None:
        end = self.elapsed()
        self.faults.append((start, end, what))
        console.print(f"[dim]t=+{start:5.1f}s..{end:.1f}s[/] fault: {what}")


class Feeder(threading.Thread):
    """Inserts about `rate` messages a second until stopped, as the web app would."""

    def __init__(self, messages: Collection[Doc], rate: float, seed: int, extras: Doc) -> None:
        super().__init__(name="feeder", daemon=True)
        self.messages = messages
        self.rate = rate
        self.rng = random.Random(seed)
        self.session_ids: list[ObjectId] = extras["sessions"]
        self.campaign_ids: list[ObjectId] = extras["campaigns"]
        self.stopping = threading.Event()
        self.inserted = 0
        self.last_due = datetime.now(UTC)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self.insert(self.document(self.inserted))
            next_at = max(next_at + 1 / self.rate, time.monotonic() - 1)  # no catch-up burst
            self.stopping.wait(max(0.0, next_at - time.monotonic()))

    def document(self, n: int) -> Doc:
        due = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(0, 5))
        doc: Doc = {
            "_id": ObjectId(),  # chosen here, so that a retried insert cannot insert twice
            "scheduledAt": due,
            "chatId": f"4477{n:08d}@c.us",
            "content": f"Soak message {n}",
            "isSent": False,
            "isPicked": False,
            "isDeleted": False,
        }
        index = self.rng.randrange(len(SESSIONS))
        draw = self.rng.random()
        if draw < 0.2:
            doc["sessionId"] = self.session_ids[index]
        elif draw < 0.3:
            doc["sessionId"] = str(self.session_ids[index])  # the hex string form
        else:
            doc["session"] = SESSIONS[index]
        if self.rng.random() < 0.1:
            doc["campaignId"] = self.rng.choice(self.campaign_ids)
        return doc

    def insert(self, doc: Doc) -> None:
        """Insert, retrying through MongoDB outages until it is stored or the feeder stops."""
        while True:
            try:
                self.messages.insert_one(doc)
                break
            except DuplicateKeyError:
                break  # an earlier attempt was stored, its answer lost
            except PyMongoError:
                if self.stopping.wait(0.2):
                    return
        self.inserted += 1
        self.last_due = max(self.last_due, doc["scheduledAt"])


def seed_collections(db: Any) -> Doc:
    """The session documents `sessionId` points at, and three running campaigns."""
    sessions = [db["whatsappsessions"].insert_one({"name": n}).inserted_id for n in SESSIONS]
    campaigns = [
        db["campaigns"].insert_one({"name": f"Soak campaign {n}", "status": "running"}).inserted_id
        for n in range(3)
    ]
    return {"sessions": sessions, "campaigns": campaigns}


# -- faults --------------------------------------------------------------------------------------


def kill_replica(soak: Soak) -> str:
    """SIGKILL a replica while it has a message in flight, and start a replacement: the first
    replica seen sending (or, after half the wait, with a message claimed) is the victim."""
    owners = {instance(name): name for name in soak.replicas.running()}
    found = wait_for_work(soak.messages, owners, timeout=KILL_WAIT_SECONDS)
    if found is None:
        raise RuntimeError(f"no replica had a message in flight within {KILL_WAIT_SECONDS:g} s")
    victim, doc = found
    soak.replicas.kill(victim)
    replacement = soak.replicas.start()
    # Seen a few milliseconds before the SIGKILL: the send may have completed in between.
    soak.caught[doc["_id"]] = f"seen {doc['status']} by {victim} just before its SIGKILL"
    return f"SIGKILL {victim} while {doc['status']} {doc['chatId']}; started {replacement}"


def wait_for_work(
    messages: Collection[Doc], owners: dict[str, str], timeout: float
) -> tuple[str, Doc] | None:
    """The first of `owners` (instance id -> replica) seen sending a message (or, after half the
    time, with one claimed), and that message."""
    began = time.monotonic()
    fields = {"pickedBy": 1, "status": 1, "chatId": 1}
    while (waited := time.monotonic() - began) < timeout:
        wanted = ["sending"] if waited < timeout / 2 else ["sending", "claimed"]
        try:
            for doc in messages.find({"status": {"$in": wanted}}, fields):
                owner = str(doc.get("pickedBy", "")).split("/", 1)[0]
                if owner in owners:
                    return owners[owner], doc
        except PyMongoError:
            pass
        time.sleep(0.005)
    return None


def waha_outage(soak: Soak, seconds: float = 3.0) -> str:
    """WAHA goes away: open connections are dropped, new ones refused; back on the same port."""
    port = int(soak.waha.url.rsplit(":", 1)[1])
    soak.waha.stop()
    time.sleep(seconds)
    for attempt in range(50):
        try:
            soak.waha.start(port=port)
            break
        except OSError:
            if attempt == 49:
                raise
            time.sleep(0.1)
    return f"WAHA down for {seconds:g} s, back on port {port}"


def mongo_failures(soak: Soak) -> str:
    """Two bursts of failing commands: dropped connections, then errors."""
    commands = ["find", "update", "findAndModify", "aggregate", "count"]
    soak.daemon.fail(commands, 6, closeConnection=True)
    time.sleep(2)
    soak.daemon.fail(commands, 6, errorCode=2)
    return f"MongoDB: next 6 of {'/'.join(commands)} closed the connection, 2 s later 6 failed"


def mongo_restart(soak: Soak, seconds: float = 2.0) -> str:
    soak.daemon.kill()
    time.sleep(seconds)
    began = time.monotonic()
    soak.daemon.start()
    took = time.monotonic() - began
    return f"MongoDB SIGKILLed, started again {seconds:g} s later (up in {took:.1f} s)"


def slow_waha(soak: Soak, seconds: float = 4.0, latency: float = 2.5) -> str:
    soak.waha.latency = latency
    time.sleep(seconds)
    soak.waha.latency = 0.0
    return f"WAHA answers sendText after {latency:g} s (timeout 2 s) for {seconds:g} s"


# When each fault starts, as a share of the run.
SCHEDULE: list[tuple[float, Callable[[Soak], str]]] = [
    (0.12, kill_replica),
    (0.30, waha_outage),
    (0.45, mongo_failures),
    (0.60, mongo_restart),
    (0.78, slow_waha),
]


def inject_faults(soak: Soak, duration: float, stop: threading.Event) -> None:
    for share, fault in SCHEDULE:
        if stop.wait(max(0.0, share * duration - soak.elapsed())):
            return
        start = soak.elapsed()
        try:
            soak.note(start, fault(soak))
        except Exception as exc:  # a fault that fails is reported, not fatal
            soak.note(start, f"{fault.__name__} FAILED: {exc!r}")


# -- waiting and reporting -----------------------------------------------------------------------


def unsettled(messages: Collection[Doc]) -> int:
    return messages.count_documents({"status": {"$nin": list(FINAL)}})


def progress(soak: Soak, feeder: Feeder) -> str:
    try:
        counts = Counter(d.get("status", "new") for d in soak.messages.find({}, {"status": 1}))
    except PyMongoError as exc:
        return (
            f"t=+{soak.elapsed():5.1f}s inserted={feeder.inserted} (MongoDB: {type(exc).__name__})"
        )
    shown = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"t=+{soak.elapsed():5.1f}s inserted={feeder.inserted} {shown}"


def drain(soak: Soak, feeder: Feeder, began: float) -> float:
    """Wait until every message is settled (and the last one was due), at most DRAIN_SECONDS
    after `began`; the seconds since `began`."""
    deadline = began + DRAIN_SECONDS
    last_print = began
    while time.monotonic() < deadline:
        try:
            if datetime.now(UTC) > feeder.last_due and unsettled(soak.messages) == 0:
                break
        except PyMongoError:
            pass
        if time.monotonic() - last_print >= 10:
            console.print(f"[dim]{progress(soak, feeder)} (draining)[/]")
            last_print = time.monotonic()
        time.sleep(0.5)
    return time.monotonic() - began


@dataclass
class Results:
    inserted: int
    statuses: Counter[str]
    sent_once: int
    duplicates: list[tuple[str, int]]
    not_final: list[Doc]
    sent_not_received: list[Doc]
    delivered_not_sent: int
    failed_reasons: Counter[str]
    lateness: list[tuple[float, str, datetime]]  # seconds late, chatId, sentAt; sorted
    caught: list[tuple[str, Doc, int]]  # what a fault caught, the message now, deliveries
    campaigns: list[Doc]

    @property
    def lost(self) -> int:
        return len(self.not_final) + len(self.sent_not_received)


def collect(
    messages: Collection[Doc], db: Any, waha: WahaSimulator, caught: dict[Any, str]
) -> Results:
    docs = list(messages.find({}))
    deliveries = Counter(m.chat_id for m in list(waha.sent))
    ours = {d["chatId"] for d in docs}
    sent = [d for d in docs if d.get("status") == SENT]
    lateness = sorted(
        ((d["sentAt"] - d["scheduledAt"]).total_seconds(), d["chatId"], d["sentAt"])
        for d in sent
        if isinstance(d.get("sentAt"), datetime)
    )
    by_id = {d["_id"]: d for d in docs}
    return Results(
        inserted=len(docs),
        statuses=Counter(str(d.get("status", "(none)")) for d in docs),
        sent_once=sum(1 for d in sent if deliveries[d["chatId"]] == 1),
        duplicates=sorted((c, n) for c, n in deliveries.items() if n > 1 and c in ours),
        not_final=[d for d in docs if d.get("status") not in FINAL],
        sent_not_received=[d for d in sent if deliveries[d["chatId"]] == 0],
        delivered_not_sent=sum(
            1 for d in docs if d.get("status") != SENT and deliveries[d["chatId"]] > 0
        ),
        failed_reasons=Counter(
            str(d.get("lastError"))[:60] for d in docs if d.get("status") == "failed"
        ),
        lateness=lateness,
        caught=[
            (what, by_id[i], deliveries[by_id[i]["chatId"]])
            for i, what in caught.items()
            if i in by_id
        ],
        campaigns=list(db["campaigns"].find({}, {"name": 1, "status": 1, "stats": 1})),
    )


def log_problems(folder: Path) -> Counter[str]:
    """Lines in the replicas' logs that say something unexpected happened."""
    found: Counter[str] = Counter()
    for path in sorted(folder.glob("r*.log")):
        text = path.read_text(errors="replace")
        for marker in ("Traceback", "tick failed unexpectedly", "crashed"):
            if count := text.count(marker):
                found[f"{path.name}: {marker}"] += count
    return found


def report(
    results: Results,
    soak: Soak,
    drain_seconds: float,
    codes: dict[str, int | None],
    folder: Path,
    args: argparse.Namespace,
) -> None:
    table = Table(title=f"soak: {args.minutes:g} min, {args.replicas} replicas, {args.rate:g}/s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("detail", overflow="fold")
    table.add_row("messages inserted", str(results.inserted), "")
    table.add_row("sent once", str(results.sent_once), f"status sent: {results.statuses[SENT]}")
    duplicates = ", ".join(f"{c} x{n}" for c, n in results.duplicates[:5])
    table.add_row("duplicates", str(len(results.duplicates)), duplicates)
    lost_detail = (
        f"not final: {len(results.not_final)} "
        f"{[(str(d['chatId']), d.get('status')) for d in results.not_final[:5]]}; "
        f"sent but not received: {len(results.sent_not_received)}"
    )
    table.add_row("lost", str(results.lost), lost_detail)
    failed = sum(results.failed_reasons.values())
    table.add_row("failed", str(failed), "")
    for reason, n in results.failed_reasons.most_common():
        table.add_row("", str(n), reason)
    table.add_row("expired", str(results.statuses["expired"]), "")
    table.add_row("unknown", str(results.statuses["unknown"]), "")
    table.add_row(
        "delivered, not 'sent'",
        str(results.delivered_not_sent),
        "WAHA got it, the outcome was failed/unknown (500 after delivery, crash)",
    )
    if results.lateness:
        seconds, chat, sent_at = results.lateness[-1]
        since = (sent_at - soak.began_at).total_seconds()
        median = results.lateness[len(results.lateness) // 2][0]
        p95 = results.lateness[int(len(results.lateness) * 0.95)][0]
        detail = f"{chat}, sent at t=+{since:.1f}s; median {median:.1f} s, p95 {p95:.1f} s"
        table.add_row("worst lateness", f"{seconds:.1f} s", detail)
    for what, doc, delivered in results.caught:
        detail = (
            f"{doc['chatId']} {what}; now {doc.get('status')}, attempts "
            f"{doc.get('attempts')}, delivered {delivered}x"
        )
        table.add_row("caught in flight", str(doc.get("status")), detail)
    table.add_row("drain after feeding", f"{drain_seconds:.1f} s", "")
    for campaign in results.campaigns:
        table.add_row(
            str(campaign.get("name")), str(campaign.get("status")), str(campaign.get("stats"))
        )
    exits = ", ".join(
        f"{n}={'SIGKILL' if n in soak.replicas.killed else c}" for n, c in codes.items()
    )
    table.add_row("replica exits", "", exits)
    problems = log_problems(folder)
    table.add_row("log problems", str(sum(problems.values())), str(dict(problems)))
    console.print(table)

    faults = Table(title="faults injected (seconds since feeding began)")
    faults.add_column("start", justify="right")
    faults.add_column("end", justify="right")
    faults.add_column("fault", overflow="fold")
    for start, end, what in soak.faults:
        faults.add_row(f"{start:.1f}", f"{end:.1f}", what)
    console.print(faults)


def verdict(results: Results) -> list[str]:
    """What makes the soak fail: a message delivered twice or lost, or a replica kill that
    caught no message in flight (then exactly-once under a crash was not tested)."""
    problems = []
    if results.duplicates:
        problems.append(f"{len(results.duplicates)} chat(s) received a message twice")
    if results.lost:
        problems.append(f"{results.lost} message(s) lost")
    if not results.caught:
        problems.append("no replica was SIGKILLed with a message in flight")
    return problems


# -- main ----------------------------------------------------------------------------------------


def soak(args: argparse.Namespace, folder: Path) -> int:
    duration = args.minutes * 60
    with mongo_daemon() as daemon:
        waha = WahaSimulator(
            api_key=KEY,
            sessions={name: "WORKING" for name in SESSIONS},
            error_rate=0.05,
            seed=args.seed,
        )
        waha.start()
        client: MongoClient[Doc] = MongoClient(
            daemon.uri, tz_aware=True, serverSelectionTimeoutMS=2000
        )
        replicas = Replicas(folder, replica_environment(daemon, waha))
        stop = threading.Event()
        try:
            db = client[DB]
            extras = seed_collections(db)
            for _ in range(args.replicas):
                replicas.start()
            wait_for_heartbeats(db, args.replicas)
            rng = random.Random(args.seed)
            run = Soak(daemon, waha, replicas, db["scheduledmessages"], rng)
            feeder = Feeder(run.messages, args.rate, args.seed, extras)
            faults = threading.Thread(
                target=inject_faults, args=(run, duration, stop), name="faults", daemon=True
            )
            run.began = time.monotonic()
            feeder.start()
            faults.start()
            while run.elapsed() < duration:
                time.sleep(min(10.0, max(0.0, duration - run.elapsed())))
                console.print(f"[dim]{progress(run, feeder)}[/]")
            fed = time.monotonic()
            feeder.stopping.set()
            feeder.join(timeout=10)
            stop.set()
            faults.join(timeout=40)  # a fault in progress ends within seconds (restart: 30 s)
            drain_seconds = drain(run, feeder, fed)
            codes = replicas.stop()
            results = collect(run.messages, db, waha, run.caught)
            report(results, run, drain_seconds, codes, folder, args)
            problems = verdict(results)
            for problem in problems:
                console.print(f"[bold red]soak failed:[/] {problem}")
            return 1 if problems else 0
        finally:
            stop.set()
            replicas.stop()  # again after an error: nothing is left running
            client.close()
            waha.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to feed messages")
    parser.add_argument("--replicas", type=int, default=3, help="`poller run` processes")
    parser.add_argument("--rate", type=float, default=10.0, help="messages inserted per second")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    args = parser.parse_args()
    if args.minutes <= 0 or args.replicas < 1 or args.rate <= 0:
        parser.error("--minutes and --rate must be above 0, --replicas at least 1")
    folder = Path(tempfile.mkdtemp(prefix="poller-soak-"))
    console.print(f"replica logs in {folder}")
    began = time.monotonic()
    code = soak(args, folder)
    console.print(f"wall time {time.monotonic() - began:.1f} s; exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
