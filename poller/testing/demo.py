"""`poller demo`: the main job end to end on an embedded MongoDB and the WAHA simulator."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from poller.contract import FINAL
from poller.daemon import Poller
from poller.settings import Settings, default_instance_id
from poller.testing.mongo import embedded_mongodb
from poller.testing.waha import WahaSimulator

KEY = "demo-key"


def demo() -> int:
    with embedded_mongodb() as uri, WahaSimulator(api_key=KEY) as waha:
        settings = Settings(
            mongodb_uri=uri,
            mongodb_db="poller_demo",
            waha_url=waha.url,
            waha_api_key=KEY,
            instance_id=default_instance_id(),
            # Short gaps between the messages of one session, to show pacing in a few seconds.
            pacing_min_seconds=2.0,
            pacing_max_seconds=4.0,
        )
        poller = Poller(settings)
        try:
            poller.start()
            campaign_id = _schedule(poller, datetime.now(UTC))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _all_final(poller):
                # A tick a second, or sooner when the session's next turn comes first.
                wake = poller.tick().next_at or datetime.now(UTC) + timedelta(seconds=1)
                time.sleep(min(1.0, max(0.0, (wake - datetime.now(UTC)).total_seconds())))
            _report(poller, waha, campaign_id)
        finally:
            poller.close()
    return 0


def _schedule(poller: Poller, now: datetime) -> ObjectId:
    """What the web app writes: a campaign of four messages, plus two that cannot go out."""
    session_id = poller.store.sessions.collection.insert_one({"name": "default"}).inserted_id
    campaign_id = poller.store.campaigns.collection.insert_one(
        {"name": "Spring sale", "status": "running"}
    )
    recipients = ["447700900123", "447700900124@c.us", "+44 7700 900125", "120363012345678901@g.us"]
    docs: list[dict[str, Any]] = [
        {
            "campaignId": campaign_id.inserted_id,
            "sessionId": session_id,
            "chatId": chat_id,
            "content": f"Hi! Our spring sale starts today (message {n}).",
            "scheduledAt": now + timedelta(seconds=2 * n),
            "isSent": False,
            "isPicked": False,
            "isDeleted": False,
        }
        for n, chat_id in enumerate(recipients)
    ]
    docs.append(
        {"session": "default", "chatId": "not-a-number", "content": "Hello", "scheduledAt": now}
    )
    docs.append(
        {
            "session": "default",
            "chatId": "447700900126",
            "content": "Yesterday's reminder",
            "scheduledAt": now - timedelta(hours=1),
        }
    )
    poller.store.messages.collection.insert_many(docs)
    _out(f"Scheduled {len(docs)} messages at {now:%H:%M:%S} UTC. Sending:\n")
    return ObjectId(campaign_id.inserted_id)


def _all_final(poller: Poller) -> bool:
    return poller.store.messages.collection.count_documents({"status": {"$nin": list(FINAL)}}) == 0


def _report(poller: Poller, waha: WahaSimulator, campaign_id: ObjectId) -> None:
    _out(f"\nWAHA received {len(waha.sent)} message(s) that went out, paced 2-4 s apart:\n")
    previous = None
    for message in waha.sent:
        gap = f"+{message.at - previous:.1f}s" if previous else ""
        previous = message.at
        _out(f"  {gap:>6} {message.session:<8} {message.chat_id:<28} {message.text}\n")
    _out("\nMessages in MongoDB:\n")
    # paced: how long pacing held it (slotAt - scheduledAt); late: against that plan.
    _out(f"  {'chatId':<26} {'status':<8} {'paced':>6} {'late':>6}  lastError\n")
    for doc in poller.store.messages.collection.find().sort("scheduledAt", 1):
        paced = late = ""
        if doc.get("sentAt") and doc.get("slotAt"):
            paced = f"{(doc['slotAt'] - doc['scheduledAt']).total_seconds():.1f}s"
            late = f"{(doc['sentAt'] - doc['slotAt']).total_seconds():.1f}s"
        _out(
            f"  {str(doc.get('chatId')):<26} {doc.get('status', '-'):<8} {paced:>6} {late:>6}  "
            f"{doc.get('lastError') or ''}\n"
        )
    campaign = poller.store.campaigns.collection.find_one({"_id": campaign_id}) or {}
    name, status, stats = campaign.get("name"), campaign.get("status"), campaign.get("stats")
    _out(f"\nCampaign '{name}': {status}, stats {stats}\n")


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(demo())
