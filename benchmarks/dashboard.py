"""The dashboard's cost: the page's weight, and the peak RSS of `poller run` with it on and off.

    .venv/bin/python benchmarks/dashboard.py [--messages 300] [--requests 200]

Weighs what a browser loads for the dashboard (the page, its script and its style sheet, as
served). Then runs `poller run` twice against SecantusDB (its own process) and the WAHA
simulator, each time on a campaign of `--messages` messages with receipts, failures and a
recurring schedule's worth of data: once without the dashboard, once with it while a client asks
`/api/status` `--requests` times (more than a page open for 15 minutes asks). Prints each run's
peak RSS (VmHWM of the process, from /proc) and exits 1 when the dashboard run's peak is 64 MB
or more, or the page weighs 200 KB or more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pymongo import MongoClient
from soak import DB, KEY, Replicas, replica_environment

from poller.testing.mongo import free_port, mongo_daemon
from poller.testing.waha import WahaSimulator

TOKEN = "bench-dashboard-token-0123456789"
PAGE = ("/", "/static/app.js", "/static/app.css")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    waha = WahaSimulator(api_key=KEY)
    results: dict[str, float] = {}
    weight = 0
    with mongo_daemon() as daemon, waha:
        client: MongoClient[dict[str, object]] = MongoClient(daemon.uri, tz_aware=True)
        for dashboard in (False, True):
            client.drop_database(DB)
            seed(client, args.messages)
            env = replica_environment(daemon, waha)
            port = free_port()
            env.update(
                HEALTH_PORT=str(port), POLL_INTERVAL_SECONDS="2", MONGODB_TIMEOUT_SECONDS="30"
            )
            if dashboard:
                env["DASHBOARD_TOKEN"] = TOKEN
            folder = Path(tempfile.mkdtemp(prefix="poller-dashboard-"))
            replicas = Replicas(folder, env)
            name = replicas.start()
            pid = replicas.processes[name].pid
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base)
            if dashboard:
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as h:
                    weight = sum(len(h.get(path).content) for path in PAGE)
                    for _ in range(args.requests):
                        assert h.get("/api/status").status_code == 200
                        time.sleep(0.05)
            else:
                time.sleep(0.05 * args.requests)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and pending(client) > 0:
                time.sleep(0.5)
            results["on" if dashboard else "off"] = peak_rss_mb(pid)
            replicas.stop()
        client.close()
    print(f"page weight (/, app.js, app.css as served): {weight / 1024:.1f} KB")  # noqa: T201
    for key, label in (("off", "without the dashboard"), ("on", "with the dashboard")):
        print(f"peak RSS of poller run {label}: {results[key]:.1f} MB")  # noqa: T201
    return 0 if results["on"] < 64 and weight < 200 * 1024 else 1


def seed(client: MongoClient[dict[str, object]], count: int) -> None:
    db = client[DB]
    now = datetime.now(UTC)
    campaign = db["campaigns"].insert_one({"name": "Bench", "status": "running"}).inserted_id
    db["scheduledmessages"].insert_many(
        [
            {
                "scheduledAt": now - timedelta(seconds=n % 60),
                "session": "default",
                "chatId": f"4477{n:08d}@c.us",
                "content": f"Message {n}",
                "campaignId": campaign,
            }
            for n in range(count)
        ]
    )


def pending(client: MongoClient[dict[str, object]]) -> int:
    return client[DB]["scheduledmessages"].count_documents({"isSent": {"$ne": True}})


def wait_healthy(base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("poller run did not become healthy within 120 s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc: run this on Linux")


if __name__ == "__main__":
    sys.exit(main())
