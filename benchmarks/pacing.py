"""Pacing as WAHA sees it: the gaps between each session's sends while replicas race for turns.

    .venv/bin/python benchmarks/pacing.py [--replicas 3] [--sessions 3] [--messages 15]
                                          [--min 2] [--max 5] [--typing]

Inserts `--messages` messages per WhatsApp session, all with the same `scheduledAt` (a campaign
written at once), starts `--replicas` `poller run` daemons with PACING_MIN_SECONDS=`--min` and
PACING_MAX_SECONDS=`--max` against SecantusDB (its own process) and the WAHA simulator, waits
until every message is sent, and prints, per session, the gaps between consecutive sends as the
simulator received them (min, median, max) against the configured range, and which replicas
sent them.

Exit code 1 when a gap is below the minimum, or a message was not delivered exactly once.
A gap is measured from one request's arrival to the next: it holds the configured gap plus the
time the poller takes around it (a few SecantusDB writes; less on mongod).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pymongo import MongoClient
from rich.console import Console
from rich.table import Table
from soak import DB, KEY, Replicas, campaign_at_once, replica_environment

from poller.testing.mongo import mongo_daemon
from poller.testing.waha import WahaSimulator

console = Console(width=None if sys.stdout.isatty() else 120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--messages", type=int, default=15, help="per session")
    parser.add_argument("--min", type=float, default=2.0, help="PACING_MIN_SECONDS")
    parser.add_argument("--max", type=float, default=5.0, help="PACING_MAX_SECONDS")
    parser.add_argument("--typing", action="store_true", help="TYPING=1, TYPING_MAX_SECONDS=1")
    args = parser.parse_args()
    sessions = [f"s{n + 1}" for n in range(args.sessions)]
    total = args.messages * len(sessions)

    waha = WahaSimulator(api_key=KEY, sessions=dict.fromkeys(sessions, "WORKING"))
    with mongo_daemon() as daemon, waha:
        client: MongoClient[dict[str, object]] = MongoClient(daemon.uri, tz_aware=True)
        messages = client[DB]["scheduledmessages"]
        messages.insert_many(campaign_at_once(sessions, args.messages))
        env = replica_environment(daemon, waha)
        # The default interval: the replicas wake for each session's next turn, not on a timer.
        env.update(
            PACING_MIN_SECONDS=str(args.min),
            PACING_MAX_SECONDS=str(args.max),
            POLL_INTERVAL_SECONDS="30",
        )
        if args.typing:
            env.update(TYPING="1", TYPING_MAX_SECONDS="1")
        folder = Path(tempfile.mkdtemp(prefix="poller-pacing-"))
        replicas = Replicas(folder, env)
        started = time.monotonic()
        for _ in range(args.replicas):
            replicas.start()
        expected = args.messages * (args.max + 2) + 30
        while len(waha.sent) < total and time.monotonic() - started < expected:
            time.sleep(0.5)
        took = time.monotonic() - started
        codes = replicas.stop()
        senders = {d["chatId"]: d.get("pickedBy", "?").split("/")[0] for d in messages.find()}
        client.close()

    table = Table(title=f"pacing {args.min:g}-{args.max:g} s, {args.replicas} replicas")
    for column in ("session", "sent", "gap min", "gap median", "gap max", "sent by"):
        table.add_column(column, justify="right")
    failed = False
    for session in sessions:
        sends = sorted((m for m in waha.sent if m.session == session), key=lambda m: m.at)
        gaps = [b.at - a.at for a, b in zip(sends, sends[1:], strict=False)]
        by = Counter(senders.get(m.chat_id, "?") for m in sends)
        failed |= len(sends) != args.messages or (bool(gaps) and min(gaps) < args.min)
        table.add_row(
            session,
            str(len(sends)),
            *(f"{f(gaps):.2f} s" if gaps else "-" for f in (min, statistics.median, max)),
            ", ".join(f"{name} {n}" for name, n in sorted(by.items())),
        )
    console.print(table)
    chats = Counter(m.chat_id for m in waha.sent)
    duplicates = sum(n - 1 for n in chats.values() if n > 1)
    failed |= duplicates > 0 or len(chats) != total
    console.print(
        f"{len(chats)} of {total} messages delivered, {duplicates} duplicates, in {took:.1f} s; "
        f"replica exits {codes}; logs in {folder}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
