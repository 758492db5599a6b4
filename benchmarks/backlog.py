"""A big paced campaign at a flat cost: what it writes and reads, and how long a tick takes, as
the campaign grows.

    .venv/bin/python benchmarks/backlog.py [--sizes 1000 5000 20000] [--sends 200]
                                           [--report docs/benchmarks.md]

For each size N: one campaign of N messages, all due at once, over 4 WhatsApp sessions, default
pacing (gaps of 10-25 s), against SecantusDB (a process of its own) and the WAHA simulator.
The ticks run on a fake clock, each at the time the one before asked for, until `--sends`
messages went out (the whole campaign would take hours of that clock). Command monitoring
counts the documents each write changed. Printed per N:

- message writes per message: the writes that set plannedAt per message planned (once, when
  first seen, and again only when an event moves its plan), then the others per message sent
  (claim, sending, outcome);
- other writes per message sent (the sessions' turns, the campaign's rollup);
- what a claim round examines: explain() of each lane's claim query, summed over the lanes;
- tick time: the planning tick, and the median and 95th percentile of the sending ticks.

SecantusDB writes a document in about 10-30 ms: the planning tick's time grows with N there
(one write per message); mongod takes a fraction of that.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.store.plans import QUEUE_INDEX, queue_query
from poller.testing.mongo import mongo_daemon
from poller.testing.waha import WahaSimulator
from poller.testing.writes import Writes
from poller.tick import tick
from poller.waha import WahaClient

console = Console(width=None if sys.stdout.isatty() else 120)
KEY = "bench-key"
SESSIONS = ["s1", "s2", "s3", "s4"]
BATCH = 20


def run(uri: str, n: int, sends: int, waha: WahaSimulator) -> dict[str, float]:
    writes = Writes()
    client: MongoClient[dict[str, Any]] = MongoClient(uri, tz_aware=True, event_listeners=[writes])
    settings = Settings(mongodb_uri=uri, mongodb_db=f"backlog_{n}", instance_id="bench")
    store = Store(client, settings)
    store.ensure_indexes()
    messages = store.messages.collection.name
    start = datetime.now(UTC).replace(microsecond=0)
    campaign = store.campaigns.collection.insert_one({"name": "Big", "status": "running"})
    docs = [
        {
            "scheduledAt": start,
            "session": SESSIONS[i % len(SESSIONS)],
            "chatId": f"4477{i:08d}@c.us",
            "content": "Our spring sale starts today.",
            "campaignId": campaign.inserted_id,
            "isPicked": False,
        }
        for i in range(n)
    ]
    for chunk in range(0, n, 5000):
        store.messages.collection.insert_many(docs[chunk : chunk + 5000])
    writes.take(messages)
    now = [start]
    pacing = Pacing(10, 25)
    client_waha = WahaClient(waha.url, KEY, 30)
    times: list[float] = []
    examined: list[tuple[int, int]] = []
    sent = planned = plan_writes = send_writes = other_writes = 0
    next_at: datetime | None = start
    while sent < sends:
        now[0] = next_at or now[0] + timedelta(seconds=30)
        if sent:
            examined.append(_claim_examined(store, now[0]))
        began = time.perf_counter()
        counts = tick(store, client_waha, BATCH, pacing=pacing, clock=lambda: now[0])
        times.append(time.perf_counter() - began)
        next_at, sent, planned = counts.next_at, sent + counts.sent, planned + counts.planned
        plan_writes += writes.planned[messages]
        send_writes += writes.changed[messages] - writes.planned[messages]
        other_writes += sum(writes.changed.values()) - writes.changed[messages]
        writes.take(messages)
        if len(times) % 10 == 1:
            console.print(f"  tick {len(times)}: {sent} sent, {planned} planned, {times[-1]:.2f} s")
    client_waha.close()
    store.client.drop_database(settings.mongodb_db)
    client.close()
    keys = [k for k, _ in examined]
    docs_seen = [d for _, d in examined]
    return {
        "n": n,
        "planned": planned,
        "sent": sent,
        "plan writes / message": plan_writes / planned,
        "send writes / sent": send_writes / sent,
        "message writes / message": plan_writes / planned + send_writes / sent,
        "other writes / sent": other_writes / sent,
        "keys examined / round (max)": max(keys),
        "docs examined / round (max)": max(docs_seen),
        "planning tick (s)": times[0],
        "tick median (s)": statistics.median(times[1:]),
        "tick p95 (s)": statistics.quantiles(times[1:], n=20)[-1],
        "fake hours": (now[0] - start).total_seconds() / 3600,
    }


def _claim_examined(store: Store, now: datetime) -> tuple[int, int]:
    """Keys and documents the claim's one read of the queue examines at `now` (explain)."""
    query = queue_query(now + store.timings.tick_interval)
    found = store.messages.collection.find(query, sort=[("plannedAt", 1)], hint=QUEUE_INDEX)
    stats = found.limit(4 * 20 + 10).explain()["executionStats"]
    return stats["totalKeysExamined"], stats["totalDocsExamined"]


ROWS = [
    ("plan writes / message", "{:.2f}"),
    ("send writes / sent", "{:.2f}"),
    ("message writes / message", "{:.2f}"),
    ("other writes / sent", "{:.2f}"),
    ("keys examined / round (max)", "{:.0f}"),
    ("docs examined / round (max)", "{:.0f}"),
    ("planning tick (s)", "{:.1f}"),
    ("tick median (s)", "{:.3f}"),
    ("tick p95 (s)", "{:.3f}"),
    ("fake hours", "{:.2f}"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--sends", type=int, default=200, help="messages sent per size")
    parser.add_argument("--report", type=Path, help="Markdown file to write the results into")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    results = []
    with mongo_daemon() as daemon:
        uri = daemon.uri
        waha = WahaSimulator(api_key=KEY, sessions=dict.fromkeys(SESSIONS, "WORKING")).start()
        for n in args.sizes:
            console.print(f"N = {n}")
            results.append(run(uri, n, args.sends, waha))
        waha.stop()
    table = Table(title=f"A campaign due at once over {len(SESSIONS)} sessions, paced 10-25 s")
    table.add_column("")
    for result in results:
        table.add_column(f"N = {result['n']:,}", justify="right")
    for label, fmt in ROWS:
        table.add_row(label, *(fmt.format(r[label]) for r in results))
    console.print(table)
    limit = 2 * (BATCH + len(SESSIONS))
    ok = all(
        r["message writes / message"] <= 4 and r["docs examined / round (max)"] <= limit
        for r in results
    )
    console.print(
        f"targets: message writes per message <= 4; documents examined per round <= {limit}: "
        + ("met" if ok else "MISSED")
    )
    if args.report:
        _report(args.report, results, limit, args.sends)
    return 0 if ok else 1


def _report(path: Path, results: list[dict[str, float]], limit: int, sends: int) -> None:
    """Write the table between its markers in `path` (added at the end the first time)."""
    sizes = " ".join(str(int(r["n"])) for r in results)
    lines = [
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {platform.platform()}, "
        f"{os.cpu_count()} CPUs; SecantusDB as its own process.",
        "",
        f"`.venv/bin/python benchmarks/backlog.py --sizes {sizes} --sends {sends} --report "
        f"{path}`. Targets: at most 4 message writes per message, at most {limit} documents "
        f"examined per claim round (2 × (batch {BATCH} + {len(SESSIONS)} sessions)).",
        "",
        "| | " + " | ".join(f"N = {int(r['n']):,}" for r in results) + " |",
        "| --- |" + " ---: |" * len(results),
    ]
    for label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[label]) for r in results) + " |")
    begin, end = "<!-- backlog -->", "<!-- /backlog -->"
    text = path.read_text()
    block = "\n".join([begin, *lines, end])
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n## A big paced campaign\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
