"""WAHA's events as each edition and engine posts them, end to end through `poller run`.

    .venv/bin/python benchmarks/webhooks.py

Runs `poller run` (EVENTS=webhook, WEBHOOK_SECRET and WEBHOOK_HMAC_KEY set) against SecantusDB
(its own process) and four WAHA simulators, one per way an engine answers a send: NOWEB (the
raw Baileys message), WEBJS (`id._serialized`), GOWS and the published spec (`id`). Each
simulator has one session, and each message one chat. Once a message is sent, its acks are
posted as that engine's edition posts them: NOWEB's as WAHA Core 2024.10.8 does (unsigned, no
retry, to the URL with the secret), the others signed as 2026.7.1 does. Then one Core-style post
to the URL without the secret, which is refused.

Prints what each send answered and stored, which acks matched, `poller check`'s output and the
refusal metrics. Exits 1 when a receipt did not match or the refusal does not show.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table
from soak import DB, KEY, Replicas, replica_environment

from poller.testing.mongo import free_port, mongo_daemon
from poller.testing.waha import SentMessage, WahaSimulator
from poller.testing.webhooks import CORE_2024, LATEST, Edition, Webhook, ack_event

SECRET = "bench-secret-4f1e9c"
HMAC_KEY = "bench-hmac-7a2b3c"
ENGINES = {"noweb": "NOWEB", "webjs": "WEBJS", "gows": "GOWS", "spec": ""}
CHATS = {
    "noweb": "447700900001",
    "webjs": "447700900002",
    "gows": "447700900003",
    "spec": "447700900004",
}


def main() -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    simulators = {name: WahaSimulator(api_key=KEY, sessions={name: "WORKING"}) for name in ENGINES}
    for name, engine in ENGINES.items():
        simulators[name].engine = engine
        simulators[name].on_send = lambda sent, name=name: post_acks(base, name, sent)
    with mongo_daemon() as daemon:
        for simulator in simulators.values():
            simulator.start()
        try:
            client: MongoClient[dict[str, Any]] = MongoClient(daemon.uri, tz_aware=True)
            env = replica_environment(daemon, simulators["spec"])
            env.pop("WAHA_URL")
            env.update(
                WAHA_SERVERS=",".join(ENGINES),
                **{f"WAHA_{n.upper()}_URL": s.url for n, s in simulators.items()},
                HEALTH_PORT=str(port),
                EVENTS="webhook",
                WEBHOOK_SECRET=SECRET,
                WEBHOOK_HMAC_KEY=HMAC_KEY,
                POLL_INTERVAL_SECONDS="1",
                PACING_MIN_SECONDS="0",
                PACING_MAX_SECONDS="0",
            )
            folder = Path(tempfile.mkdtemp(prefix="poller-webhooks-"))
            replicas = Replicas(folder, env)
            replicas.start()
            messages = client[DB]["scheduledmessages"]
            messages.insert_many(
                [
                    {
                        "scheduledAt": datetime.now(UTC),
                        "content": f"Hello from {name}",
                        "chatId": CHATS[name],
                        "session": name,
                        "isSent": False,
                        "isDeleted": False,
                        "isPicked": False,
                    }
                    for name in ENGINES
                ]
            )
            matched = wait(lambda: messages.count_documents({"ack": 3}) == len(ENGINES), 120)
            refused = Webhook(f"{base}/waha/events", HMAC_KEY, edition=CORE_2024)
            refused_status = refused.post(
                ack_event("true_447700900001@c.us_AB", 3, edition=CORE_2024)
            )
            # The heartbeat carries the refusal to `poller check` within HEARTBEAT_SECONDS.
            wait(lambda: heartbeat_refusals(client) > 0, 60)
            check = subprocess.run(
                [sys.executable, "-m", "poller", "check"],
                env=env,
                cwd=folder,
                capture_output=True,
                text=True,
                check=False,
            )
            metrics = httpx.get(f"{base}/metrics").text
            report(messages, simulators, refused_status, check.stdout, metrics)
            replicas.stop()
        finally:
            for simulator in simulators.values():
                simulator.stop()
    ok = matched and refused_status == 401 and "refused in the last hour: 1" in check.stdout
    return 0 if ok else 1


def post_acks(base: str, name: str, sent: SentMessage) -> None:
    """A message's acks, as its engine's edition posts them."""
    if name == "noweb":
        hook = Webhook(f"{base}/waha/events/{SECRET}", HMAC_KEY, edition=CORE_2024)
        edition = CORE_2024
    else:
        hook = Webhook(f"{base}/waha/events", HMAC_KEY, attempts=30, delay=0.5)
        edition = Edition(LATEST.version, ENGINES[name] or "GOWS")
    for ack in (1, 2, 3):
        hook.post(ack_event(sent.id, ack, sent.session, edition=edition))
    print(f"{name}: acks posted for {sent.id}: answers {hook.answers}")


def heartbeat_refusals(client: MongoClient[dict[str, Any]]) -> int:
    beats = client[DB]["pollerheartbeats"].find({}, {"eventsRefused": 1})
    return sum(sum((b.get("eventsRefused") or {}).values()) for b in beats)


def wait(done: Any, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.2)
    return False


def report(
    messages: Any,
    simulators: dict[str, WahaSimulator],
    refused: int,
    check: str,
    metrics: str,
) -> None:
    console = Console(width=160)
    table = Table(title="Receipts by engine")
    for column in (
        "engine",
        "sendText answered",
        "wahaMessageId",
        "wahaKeyId",
        "ack event id",
        "ack",
    ):
        table.add_column(column)
    for name in ENGINES:
        doc = messages.find_one({"session": name}) or {}
        sent = simulators[name].sent[0] if simulators[name].sent else None
        answered = {
            "noweb": "key.id (no id)",
            "webjs": "id._serialized",
            "gows": "id",
            "spec": "id",
        }[name]
        table.add_row(
            ENGINES[name] or "(spec)",
            answered,
            str(doc.get("wahaMessageId")),
            str(doc.get("wahaKeyId")),
            sent.id if sent else "-",
            str(doc.get("ack")),
        )
    console.print(table)
    console.print(f"Core-style post without the secret: {refused}")
    console.print("poller check:\n" + check)
    console.print("/metrics:")
    for line in metrics.splitlines():
        if line.startswith(("poller_webhook_refused_total", "poller_acks_total")):
            console.print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
