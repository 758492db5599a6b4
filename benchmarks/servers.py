"""Three WAHA servers, one taken down mid-campaign: what each received, and the others' pace.

    .venv/bin/python benchmarks/servers.py [--messages 12] [--min 2] [--max 4] [--replicas 1]
                                           [--down-after 12]

Three WAHA simulators (a, b, c), each with its own API key and two WhatsApp sessions of its own
(a1 a2 on a, ...). `--messages` messages per session, all due at once, go out through
`--replicas` `poller run` daemons with WAHA_SERVERS=a,b,c and PACING_MIN_SECONDS=`--min`,
PACING_MAX_SECONDS=`--max`, against SecantusDB (its own process). Once server c has delivered
`--down-after` messages, it is stopped. The run ends when every message of a and b is sent.

Prints, per server, the requests it received and the messages it delivered; per session, the
gaps between its sends (min, median, max) before and after c went down. Exit code 1 when a
message was delivered twice or through a server that does not hold its session, a message of
a or b was not delivered, or a gap is below the minimum.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

from pymongo import MongoClient
from rich.console import Console
from rich.table import Table
from soak import DB, Replicas, campaign_at_once, replica_environment

from poller.testing.mongo import mongo_daemon
from poller.testing.waha import WahaSimulator

console = Console(width=None if sys.stdout.isatty() else 120)
SERVERS = ("a", "b", "c")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=12, help="per session")
    parser.add_argument("--min", type=float, default=2.0, help="PACING_MIN_SECONDS")
    parser.add_argument("--max", type=float, default=4.0, help="PACING_MAX_SECONDS")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--down-after",
        type=int,
        default=12,
        help="c's deliveries before it stops (of 2 × messages)",
    )
    args = parser.parse_args()
    wahas = {
        name: WahaSimulator(
            api_key=f"key-{name}", sessions={f"{name}1": "WORKING", f"{name}2": "WORKING"}
        ).start()
        for name in SERVERS
    }
    sessions = [s for w in wahas.values() for s in w.sessions]
    with mongo_daemon() as daemon:
        client: MongoClient[dict[str, object]] = MongoClient(daemon.uri, tz_aware=True)
        messages = client[DB]["scheduledmessages"]
        messages.insert_many(campaign_at_once(sessions, args.messages))
        env = replica_environment(daemon, wahas["a"])
        del env["WAHA_URL"], env["WAHA_API_KEY"]
        env["WAHA_SERVERS"] = ",".join(SERVERS)
        for name, waha in wahas.items():
            env[f"WAHA_{name.upper()}_URL"] = waha.url
            env[f"WAHA_{name.upper()}_API_KEY"] = f"key-{name}"
        env.update(PACING_MIN_SECONDS=str(args.min), PACING_MAX_SECONDS=str(args.max))
        folder = Path(tempfile.mkdtemp(prefix="poller-servers-"))
        replicas = Replicas(folder, env)
        started = time.monotonic()
        for _ in range(args.replicas):
            replicas.start()
        wanted = 4 * args.messages  # the messages of a and b
        expected = 2 * args.messages * (args.max + 2) + 60
        down_at = None
        while time.monotonic() - started < expected:
            if down_at is None and len(wahas["c"].sent) >= args.down_after:
                wahas["c"].stop()
                down_at = time.time()
            if sum(len(wahas[n].sent) for n in ("a", "b")) >= wanted:
                break
            time.sleep(0.2)
        took = time.monotonic() - started
        codes = replicas.stop()
        waiting = list(messages.find({"session": {"$in": ["c1", "c2"]}, "isSent": {"$ne": True}}))
        client.close()
    for waha in (wahas["a"], wahas["b"]):
        waha.stop()
    return report(args, wahas, down_at, took, codes, waiting, folder)


def report(
    args: argparse.Namespace,
    wahas: dict[str, WahaSimulator],
    down_at: float | None,
    took: float,
    codes: object,
    waiting: list[dict[str, object]],
    folder: Path,
) -> int:
    failed = False
    servers = Table(title=f"{len(SERVERS)} WAHA servers; c stopped after {args.down_after} sends")
    for column in ("server", "requests", "sends delivered", "sessions", "wrong server"):
        servers.add_column(column, justify="right")
    for name, waha in wahas.items():
        wrong = sum(1 for m in waha.sent if m.session not in waha.sessions)
        failed |= wrong > 0
        servers.add_row(
            name, str(len(waha.requests)), str(len(waha.sent)), " ".join(waha.sessions), str(wrong)
        )
    console.print(servers)

    pace = Table(title=f"gaps between a session's sends (pacing {args.min:g}-{args.max:g} s)")
    for column in ("session", "sent", "before c went down", "after c went down"):
        pace.add_column(column, justify="right")
    for name, waha in wahas.items():
        for session in waha.sessions:
            sends = sorted((m for m in waha.sent if m.session == session), key=lambda m: m.at)
            gaps = [(b.at, b.at - a.at) for a, b in pairwise(sends)]
            before = [g for at, g in gaps if down_at is None or at <= down_at]
            after = [g for at, g in gaps if down_at is not None and at > down_at]
            failed |= any(g < args.min for _, g in gaps)
            failed |= name != "c" and len(sends) != args.messages
            pace.add_row(session, str(len(sends)), _spread(before), _spread(after))
    console.print(pace)
    chats = Counter(m.chat_id for w in wahas.values() for m in w.sent)
    duplicates = sum(n - 1 for n in chats.values() if n > 1)
    failed |= duplicates > 0
    console.print(
        f"{len(chats)} messages delivered, {duplicates} duplicates, in {took:.1f} s; "
        f"{len(waiting)} of c's messages wait; replica exits {codes}; logs in {folder}"
    )
    reasons = Counter(str(d.get("lastError")) for d in waiting)
    for reason, n in reasons.most_common(3):
        console.print(f"  {n} wait with lastError: {reason}")
    return 1 if failed else 0


def _spread(gaps: list[float]) -> str:
    if not gaps:
        return "-"
    return f"{min(gaps):.2f} / {statistics.median(gaps):.2f} / {max(gaps):.2f} s ({len(gaps)} gaps)"


if __name__ == "__main__":
    sys.exit(main())
