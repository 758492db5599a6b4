"""WAHA's events: delivery receipts recorded on each message and counted per campaign, opt-outs
honoured, and a webhook endpoint that takes only authentic posts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS31Validator
from support import (
    NO_SPEC,
    SPEC,
    WEBHOOK_KEY,
    environment,
    event_post,
    message,
    replicas,
    serving_events,
    utcnow,
    wait_until,
)

from poller import status
from poller.events import EVENTS_PATH, Receiver
from poller.metrics import Metrics
from poller.settings import ConfigError, Settings
from poller.store import Store
from poller.store.optouts import ACTIVE, OPTED_OUT
from poller.testing.mongo import free_port
from poller.testing.waha import SentMessage, WahaSimulator
from poller.testing.webhooks import CORE_2024, Webhook, ack_event, message_event
from poller.tick import tick
from poller.waha import WahaClient

HMAC_KEY = WEBHOOK_KEY


def receiver(store: Store, **fields: Any) -> Receiver:
    values: dict[str, Any] = {
        "hmac_key": HMAC_KEY,
        "secret": "",
        "max_bytes": 100_000,
        "optout_words": frozenset({"STOP", "UNSUBSCRIBE"}),
        "optin_words": frozenset({"START"}),
    }
    values.update(fields)
    return Receiver(store, **values)


@pytest.fixture
def served(store: Store) -> Iterator[tuple[Receiver, str]]:
    """A receiver behind the metrics server, and the URL WAHA posts to."""
    events = receiver(store)
    with serving_events(events) as url:
        yield events, url


def send_campaign(store: Store, client: WahaClient, chats: list[str]) -> Any:
    campaign = store.campaigns.collection.insert_one({"name": "Menu", "status": "running"})
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=chat, campaignId=campaign.inserted_id) for chat in chats]
    )
    assert tick(store, client, 20, now=now).sent == len(chats)
    return campaign.inserted_id


def waha_ids(store: Store) -> list[str]:
    found = store.messages.collection.find({"status": "sent"}).sort("chatId", 1)
    return [d["wahaMessageId"] for d in found]


# -- receipts -------------------------------------------------------------------------------------


def test_acks_in_any_order_and_repeated_leave_the_highest_and_the_first_times(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    send_campaign(store, client, ["447700900001"])
    (waha_id,) = waha_ids(store)
    events = receiver(store)
    start = datetime(2026, 11, 29, 12, tzinfo=UTC)
    for n, ack in enumerate([1, 3, 2, 3, 1, 2]):
        event = ack_event(waha_id, ack)
        event["timestamp"] = int((start + timedelta(seconds=n)).timestamp() * 1000)
        events.apply(event)

    doc = store.messages.collection.find_one({"wahaMessageId": waha_id})
    assert doc is not None
    assert doc["ack"] == 3 and doc["status"] == "sent"
    # The read came first (out of order): it was delivered then too.
    assert doc["deliveredAt"] == doc["readAt"] == start + timedelta(seconds=1)
    assert events.acks == {"1": 2, "3": 2, "2": 2}


def test_an_error_ack_notes_why_and_keeps_sent(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    send_campaign(store, client, ["447700900001"])
    (waha_id,) = waha_ids(store)
    events = receiver(store)
    events.apply(ack_event(waha_id, -1))
    doc = store.messages.collection.find_one({"wahaMessageId": waha_id})
    assert doc is not None and doc["status"] == "sent" and doc["ack"] == 1 - 2
    assert "could not deliver" in doc["deliveryError"]


def test_acks_for_messages_poller_did_not_send_are_counted_and_ignored(store: Store) -> None:
    events = receiver(store)
    events.apply(ack_event("true_447700900009@c.us_ABCDEF", 3))
    assert events.acks["unknown"] == 1 and events.drain() == set()
    assert store.messages.collection.count_documents({}) == 0


def test_a_storm_of_acks_recounts_its_campaign_once(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    campaign = send_campaign(store, client, [f"4477009000{n:02d}" for n in range(3)])
    ids = waha_ids(store)
    events = receiver(store)
    for _ in range(30):  # a storm: every ack of every message, ten times over
        for waha_id in ids:
            for ack in (2, 3):
                events.apply(ack_event(waha_id, ack))
    events.apply(ack_event(ids[0], -1))
    pending = events.drain()
    assert pending == {campaign}, "one recount for the campaign, not one per ack"
    store.campaigns.count_receipts(pending)
    doc = store.campaigns.collection.find_one({"_id": campaign})
    assert doc is not None
    stats = doc["stats"]
    assert (stats["delivered"], stats["read"], stats["deliveryFailed"]) == (3, 3, 1)
    assert doc["status"] == "completed", "a finished campaign still gets its receipts"


# -- opt-outs -------------------------------------------------------------------------------------


def test_stop_opts_a_chat_out_and_start_opts_it_back_in(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    events = receiver(store, reply="You will get no more messages. Write START to undo.")
    stop = message_event("447700900001@c.us", "  stop \n", at=time.time() - 60)
    events.apply(stop)
    events.apply(stop)  # WAHA posted it again: one opt-out, one reply
    events.apply(message_event("120363000000000001@g.us", "STOP"))  # a group: ignored
    events.apply(message_event("447700900002@c.us", "stop it please"))  # not the whole message
    (optout,) = store.optouts.collection.find()
    assert (optout["session"], optout["chatId"], optout["text"]) == (
        "default",
        "447700900001@c.us",
        "  stop \n",
    )
    assert events.optouts == 1

    now = utcnow()
    later = store.messages.collection.insert_one(message(now, chat_id="447700900001")).inserted_id
    counts = tick(store, client, 20, now=now)
    doc = store.messages.collection.find_one({"_id": later})
    assert doc is not None and doc["status"] == "cancelled" and doc["lastError"] == OPTED_OUT
    assert [m.text for m in waha.sent] == ["You will get no more messages. Write START to undo."]
    assert counts.cancelled == 1 and counts.sent == 1

    events.apply(message_event("447700900001@c.us", "Start"))
    assert store.optouts.collection.count_documents(ACTIVE) == 0
    store.messages.collection.insert_one(message(now, chat_id="447700900001"))
    assert tick(store, client, 20, now=now).sent == 1


def test_an_optout_the_web_app_writes_is_honoured(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    store.optouts.collection.insert_one(
        {"session": "default", "chatId": "447700900001@c.us", "at": utcnow(), "text": "by phone"}
    )
    now = utcnow()
    store.messages.collection.insert_one(message(now, chat_id="+44 7700 900001"))
    assert tick(store, client, 20, now=now).cancelled == 1 and waha.sent == []


def test_an_optout_between_the_claim_and_the_send_is_honoured(
    store: Store, client: WahaClient, waha: WahaSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id="447700900001"), message(now, chat_id="447700900002")]
    )
    take = store.messages.claim
    events = receiver(store)

    def claim_then_opt_out(ids: list[Any], at: datetime) -> list[dict[str, Any]]:
        claimed = take(ids, at)
        if claimed:
            events.apply(message_event("447700900001@c.us", "STOP"))
        return claimed

    monkeypatch.setattr(store.messages, "claim", claim_then_opt_out)
    counts = tick(store, client, 20, now=now)
    assert (counts.sent, counts.cancelled) == (1, 1)
    assert [m.chat_id for m in waha.sent] == ["447700900002@c.us"]


# -- the webhook endpoint -------------------------------------------------------------------------


def test_the_endpoint_takes_signed_posts_only(
    served: tuple[Receiver, str], store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    events, url = served
    send_campaign(store, client, ["447700900001"])
    (waha_id,) = waha_ids(store)
    signed = Webhook(url, hmac_key=HMAC_KEY)
    assert signed.post(ack_event(waha_id, 2)) == 200
    assert Webhook(url, hmac_key="not-the-key").post(ack_event(waha_id, 3)) == 401
    assert Webhook(url).post(ack_event(waha_id, 3)) == 401
    assert signed.post(b"{not json") == 400
    assert signed.post(b'["an", "array"]') == 400
    assert signed.post(b"x" * 100_001) == 413
    assert httpx.get(url).status_code == 405
    doc = store.messages.collection.find_one({"wahaMessageId": waha_id})
    assert doc is not None and doc["ack"] == 2, "only the signed ack counted"
    assert signed.post(message_event("447700900001@c.us", "STOP")) == 200
    metrics = httpx.get(url.replace(EVENTS_PATH, "/metrics")).text
    assert 'poller_acks_total{ack="2"} 1.0' in metrics and "poller_optouts_total 1.0" in metrics


def test_status_shows_receipts_and_optouts(
    store: Store, settings: Settings, client: WahaClient, waha: WahaSimulator, capsys: Any
) -> None:
    send_campaign(store, client, ["447700900001", "447700900002"])
    events = receiver(store)
    for waha_id in waha_ids(store):
        events.apply(ack_event(waha_id, 2))
    events.apply(ack_event(waha_ids(store)[0], 3))
    events.apply(message_event("447700900003@c.us", "unsubscribe"))
    assert status.status(settings, as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    day = shown["last24h"]
    assert (day["delivered"], day["read"], day["optedOut"]) == (2, 1, 1)
    assert [o["chatId"] for o in shown["optouts"]] == ["447700900003@c.us"]


def test_a_shared_secret_header_works_instead_of_a_signature(store: Store) -> None:
    events = receiver(store, hmac_key="", secret="shared-9d3f")
    body = json.dumps(ack_event("true_447700900001@c.us_AB", 2)).encode()
    ok = events.handle(event_post(body, HTTP_X_POLLER_SECRET="shared-9d3f"))
    bad = events.handle(event_post(body, HTTP_X_POLLER_SECRET="shared"))
    assert (ok.status, bad.status) == ("200 OK", "401 Unauthorized")


def test_a_post_made_while_the_poller_was_down_arrives_when_it_is_back(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    send_campaign(store, client, ["447700900001"])
    (waha_id,) = waha_ids(store)
    port = free_port()
    webhook = Webhook(f"http://127.0.0.1:{port}{EVENTS_PATH}", HMAC_KEY, attempts=300, delay=0.1)
    posting = threading.Thread(target=webhook.post, args=(ack_event(waha_id, 3),))
    posting.start()
    wait_until(lambda: len(webhook.answers) >= 3, 60, "retries")  # nobody answers yet
    server = Metrics().serve("127.0.0.1", port, lambda: True, receiver(store))
    try:
        posting.join(timeout=60)
    finally:
        server.shutdown()
    assert webhook.answers[0] == 0 and webhook.answers[-1] == 200
    doc = store.messages.collection.find_one({"wahaMessageId": waha_id})
    assert doc is not None and doc["ack"] == 3


# -- the events as WAHA's schemas describe them ------------------------------------------------


@pytest.mark.skipif(not SPEC.exists(), reason=NO_SPEC)
@pytest.mark.parametrize(
    ("schema", "event"),
    [
        ("WAHAWebhookMessageAck", ack_event("true_447700900001@c.us_AB", 3)),
        ("WAHAWebhookMessage", message_event("447700900001@c.us", "STOP")),
        ("WAHAWebhookMessageAck", ack_event("true_447700900001@c.us_AB", 3, edition=CORE_2024)),
        ("WAHAWebhookMessage", message_event("447700900001@c.us", "STOP", edition=CORE_2024)),
    ],
)
def test_the_simulated_events_match_wahas_schemas(schema: str, event: dict[str, Any]) -> None:
    spec = json.loads(SPEC.read_text())
    components = spec["components"]
    # The published spec types `event` as an object with an enum of strings, which no value
    # can satisfy: checked here as the string it is.
    shape = json.loads(json.dumps(components["schemas"][schema]))
    shape["properties"]["event"]["type"] = "string"
    validator = OAS31Validator({**shape, "components": components})
    errors = sorted(e.message for e in validator.iter_errors(event))
    # WAHA Core 2024.10.8 posts no `id` and no `timestamp` (CONTRACT.md, section 6): the
    # published spec's only difference from what it was observed to post.
    if event["environment"]["version"] == CORE_2024.version:
        assert errors == ["'id' is a required property", "'timestamp' is a required property"]
    else:
        assert errors == []


# -- settings -------------------------------------------------------------------------------------


def test_a_webhook_without_a_key_or_a_secret_refuses_to_start() -> None:
    base = {"MONGODB_URI": "mongodb://localhost/db", "HEALTH_PORT": "9108", "EVENTS": "webhook"}
    with pytest.raises(ConfigError, match="WEBHOOK_HMAC_KEY .* or WEBHOOK_SECRET"):
        Settings.from_env(base)
    with pytest.raises(ConfigError, match="needs HEALTH_PORT"):
        Settings.from_env({**base, "HEALTH_PORT": "", "WEBHOOK_SECRET": "s"})
    settings = Settings.from_env(
        {**base, "WEBHOOK_HMAC_KEY": HMAC_KEY, "OPTOUT_KEYWORDS": "stop, Arrêt "}
    )
    assert settings.optout_keywords == ("STOP", "ARRÊT") and HMAC_KEY in settings.secrets


# -- two replicas, end to end ---------------------------------------------------------------------


def test_two_replicas_build_receipts_and_honour_an_optout(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    """WAHA with one webhook per replica: every event reaches both; each is applied once."""
    ports = [free_port(), free_port()]
    hooks = [Webhook(f"http://127.0.0.1:{p}{EVENTS_PATH}", HMAC_KEY, attempts=50) for p in ports]

    def acks(sent: SentMessage) -> None:
        for ack in (1, 2, 3):
            for hook in hooks:
                hook.post(ack_event(sent.id, ack, sent.session))

    waha.on_send = acks
    base = environment(
        settings, POLL_INTERVAL_SECONDS="1", EVENTS="webhook", WEBHOOK_HMAC_KEY=HMAC_KEY
    )
    envs = [{**base, "HEALTH_PORT": str(port)} for port in ports]
    campaign = store.campaigns.collection.insert_one({"name": "Menu", "status": "running"})
    chats = ["447700900001", "447700900002", "447700900003"]
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=c, campaignId=campaign.inserted_id) for c in chats]
    )

    def stats() -> dict[str, Any]:
        found = store.campaigns.collection.find_one({"_id": campaign.inserted_id}) or {}
        return dict(found.get("stats") or {})

    with replicas(envs, tmp_path) as codes:
        wait_until(lambda: stats().get("read") == 3, 120, "every message read")
        for hook in hooks:
            assert hook.post(message_event("447700900001@c.us", "STOP")) == 200
        later = store.messages.collection.insert_one(message(utcnow(), chat_id=chats[0]))
        wait_until(
            lambda: (
                (store.messages.collection.find_one({"_id": later.inserted_id}) or {}).get("status")
                == "cancelled"
            ),
            120,
            "the later message cancelled",
        )

    assert codes == [0, 0]
    final = stats()
    assert (final["sent"], final["delivered"], final["read"]) == (3, 3, 3)
    assert len(waha.sent) == 3, "nothing sent after the opt-out"
    doc = store.messages.collection.find_one({"_id": later.inserted_id})
    assert doc is not None and doc["lastError"] == OPTED_OUT
    print(f"campaign stats: {final}")
    print(f"later message to {chats[0]}: {doc['status']}, {doc['lastError']!r}")
