"""The reference design, as its authors describe it: the baseline `compare.py` measures against.

    .venv/bin/python benchmarks/reference.py MONGODB_URI DB WAHA_URL WAHA_API_KEY

Every 30 s: find one due message inside the two-minute lookback window and mark it picked
(one findAndModify), send it through WAHA `POST /api/sendText`, mark it sent; again until none
is due; then sleep. One message at a time, one process, no leases and no retries. SIGTERM or
SIGINT stop it between two messages.
"""

from __future__ import annotations

import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pymongo import MongoClient, ReturnDocument
from pymongo.collection import Collection

Doc = dict[str, Any]

INTERVAL = 30.0
LOOKBACK = timedelta(minutes=2)
COLLECTION = "scheduledmessages"  # the web app's collection, as poller reads it by default


def wake(messages: Collection[Doc], waha: httpx.Client, stop: threading.Event) -> int:
    """Send every due message, one at a time; how many were sent."""
    sent = 0
    while not stop.is_set():
        now = datetime.now(UTC)
        doc = messages.find_one_and_update(
            {"isPicked": False, "scheduledAt": {"$gte": now - LOOKBACK, "$lte": now}},
            {"$set": {"isPicked": True, "pickedAt": now}},
            sort=[("scheduledAt", 1)],
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return sent
        answer = waha.post(
            "/api/sendText",
            json={"session": doc["session"], "chatId": doc["chatId"], "text": doc["content"]},
        )
        if answer.is_success:
            update = {"isSent": True, "status": "sent", "sentAt": datetime.now(UTC)}
            update["wahaMessageId"] = answer.json().get("id")
            sent += 1
        else:
            update = {"status": "failed", "lastError": answer.text}
        messages.update_one({"_id": doc["_id"]}, {"$set": update})
    return sent


def main(uri: str, db: str, waha_url: str, key: str) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client: MongoClient[Doc] = MongoClient(uri, tz_aware=True)
    with httpx.Client(base_url=waha_url, headers={"X-Api-Key": key}, timeout=30) as waha:
        while not stop.is_set():
            wake(client[db][COLLECTION], waha, stop)
            stop.wait(INTERVAL)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
