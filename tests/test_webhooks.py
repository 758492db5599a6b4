"""WAHA's events as each WAHA edition and engine posts them: WAHA Core 2024.10.8's unsigned
posts let in by the secret in the webhook URL, refused posts made visible, acks matched
whatever the engine's id form, opt-out keywords as people type them, in the order they
happened, from `@lid` senders too, and any odd body answered 400."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from loguru import logger
from support import WEBHOOK_KEY, WEBHOOK_SECRET, event_post, message, serving_events, utcnow

from poller import status
from poller.daemon import Poller
from poller.events import EVENTS_PATH, Receiver
from poller.keywords import fold
from poller.settings import ConfigError, Settings
from poller.store import Store
from poller.store.optouts import ACTIVE, OPTED_OUT
from poller.testing.waha import WahaSimulator
from poller.testing.webhooks import CORE_2024, Edition, Webhook, ack_event, message_event
from poller.tick import tick
from poller.waha import WahaClient

PHONE = "447700900001@c.us"


def receiver(store: Store, **fields: Any) -> Receiver:
    values: dict[str, Any] = {
        "hmac_key": WEBHOOK_KEY,
        "secret": WEBHOOK_SECRET,
        "max_bytes": 100_000,
        "optout_words": frozenset({"STOP", "UNSUBSCRIBE", "ARRÊT"}),
        "optin_words": frozenset({"START"}),
    }
    return Receiver(store, **{**values, **fields})


@pytest.fixture
def served(store: Store) -> Iterator[tuple[Receiver, str]]:
    """A receiver (with both WEBHOOK_SECRET and WEBHOOK_HMAC_KEY) behind the metrics server,
    and the URL WAHA posts to (no secret in it)."""
    events = receiver(store)
    with serving_events(events) as url:
        yield events, url


def sent_ids(store: Store) -> list[tuple[str | None, str | None]]:
    found = store.messages.collection.find({"status": "sent"}).sort("chatId", 1)
    return [(d.get("wahaMessageId"), d.get("wahaKeyId")) for d in found]


# -- authentication, by edition -------------------------------------------------------------------


def test_wahas_core_posts_unsigned_and_the_secret_in_the_url_lets_them_in(
    served: tuple[Receiver, str], store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    events, url = served
    store.messages.collection.insert_one(message(utcnow(), chat_id=PHONE))
    assert tick(store, client, 20).sent == 1
    (sent,) = waha.sent
    # Core 2024.10.8 reads neither the webhook's hmac nor its custom headers.
    core = Webhook(
        f"{url}/{WEBHOOK_SECRET}", WEBHOOK_KEY, {"X-Poller-Secret": "x"}, 5, 0.01, CORE_2024
    )
    assert core.post(ack_event(sent.id, 2, edition=CORE_2024)) == 200
    assert core.answers == [200]
    unsigned = Webhook(url, WEBHOOK_KEY, edition=CORE_2024)
    assert unsigned.post(ack_event(sent.id, 3, edition=CORE_2024)) == 401
    assert unsigned.answers == [401], "Core does not retry"
    wrong = Webhook(f"{url}/not-the-secret", edition=CORE_2024)
    assert wrong.post(ack_event(sent.id, 3, edition=CORE_2024)) == 401
    # The later editions: the signature, and the secret header, still work.
    assert Webhook(url, WEBHOOK_KEY).post(ack_event(sent.id, 3)) == 200
    assert (
        Webhook(url, custom_headers={"X-Poller-Secret": WEBHOOK_SECRET}).post(ack_event(sent.id, 4))
        == 200
    )
    doc = store.messages.collection.find_one({"chatId": PHONE})
    assert doc is not None and doc["ack"] == 4

    assert events.refusals.last_hour(datetime.now(UTC)) == {"unsigned": 1, "wrong_secret": 1}
    metrics = httpx.get(url.replace(EVENTS_PATH, "/metrics"), timeout=30).text
    assert 'poller_webhook_refused_total{reason="unsigned"} 1.0' in metrics
    assert 'poller_webhook_refused_total{reason="wrong_secret"} 1.0' in metrics


def test_a_signature_and_a_secret_each_work_alone(store: Store) -> None:
    body = json.dumps(ack_event("true_447700900001@c.us_AB", 2)).encode()
    only_secret = receiver(store, hmac_key="")
    only_key = receiver(store, secret="")
    path = f"{EVENTS_PATH}/{WEBHOOK_SECRET}"
    assert only_secret.handle(event_post(body, path)).status == "200 OK"
    assert only_key.handle(event_post(body, path)).status == "401 Unauthorized", "no secret is set"
    signed = {"HTTP_X_WEBHOOK_HMAC": "00" * 64}
    assert only_key.handle(event_post(body, **signed)).body["reason"] == "bad_signature"


def test_refused_posts_show_in_check_status_and_the_log(
    settings: Settings, store: Store, capsys: Any
) -> None:
    poller = Poller(settings)
    poller.receiver = receiver(store)
    body = json.dumps(ack_event("true_447700900001@c.us_AB", 2, edition=CORE_2024)).encode()
    for _ in range(113):
        assert poller.receiver.handle(event_post(body)).status == "401 Unauthorized"
    poller.heartbeat()
    try:
        assert status.check(settings) == 0
        said = capsys.readouterr().out
        assert "WAHA's event posts refused in the last hour: 113, no signature or secret" in said
        assert status.status(settings, as_json=True) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["eventsRefused"] == {"unsigned": 113}
    finally:
        poller.close()


def test_a_refusal_is_logged_once_a_minute_without_the_secret(store: Store) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    now = [datetime(2026, 12, 1, 12, 0, tzinfo=UTC)]
    events = receiver(store, clock=lambda: now[0])
    body = json.dumps(ack_event("true_447700900001@c.us_AB", 2)).encode()
    try:
        for _ in range(5):
            events.handle(event_post(body, f"{EVENTS_PATH}/{WEBHOOK_SECRET}-typo"))
        now[0] += timedelta(seconds=61)
        events.handle(event_post(body, f"{EVENTS_PATH}/{WEBHOOK_SECRET}-typo"))
    finally:
        logger.remove(sink)
    assert len(lines) == 2, lines
    assert "wrong secret" in lines[0] and "4 more" in lines[1]
    assert not any(WEBHOOK_SECRET in line for line in lines)


# -- acks, by engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["", "NOWEB", "WEBJS", "GOWS"])
@pytest.mark.parametrize("edition", ["2024.10.8", "2026.7.1"])
def test_acks_match_whatever_the_engines_id_form(
    store: Store, client: WahaClient, waha: WahaSimulator, engine: str, edition: str
) -> None:
    waha.engine = engine
    group = "120363000000000001@g.us"
    now = utcnow()
    chats = ["447700900001", "447700900002", group]
    store.messages.collection.insert_many([message(now, chat_id=c) for c in chats])
    assert tick(store, client, 20, now=now).sent == 3
    assert all(key for _, key in sent_ids(store)), sent_ids(store)
    by_chat = {m.chat_id: m for m in waha.sent}
    posted = Edition(edition, engine or "GOWS")
    events = receiver(store)
    events.apply(ack_event(by_chat["447700900001@c.us"].id, 3, edition=posted))
    # A direct chat's ack may name the chat by its @lid; a group's ends with the reader.
    key = by_chat["447700900002@c.us"].id.split("_")[2]
    events.apply(ack_event(f"true_240000000000002@lid_{key}", 2, edition=posted))
    group_id = "_".join(by_chat[group].id.split("_")[:3])
    events.apply(ack_event(group_id, 2, edition=posted, participant="447700900009@c.us"))
    found = {d["chatId"]: d.get("ack") for d in store.messages.collection.find()}
    assert found == {"447700900001": 3, "447700900002": 2, group: 2}
    assert events.acks["unknown"] == 0


def test_acks_find_messages_sent_before_the_key_was_stored(store: Store) -> None:
    """A message the previous version sent has `wahaMessageId` only: NOWEB's bare key id, or
    the serialized id."""
    now = utcnow()
    store.messages.collection.insert_many(
        [
            {**message(now, chat_id="447700900001"), "status": "sent", "wahaMessageId": "BAE5A1"},
            {
                **message(now, chat_id="447700900002"),
                "status": "sent",
                "wahaMessageId": "true_447700900002@c.us_3EB0B2",
            },
        ]
    )
    events = receiver(store)
    events.apply(ack_event("true_447700900001@c.us_BAE5A1", 2))
    events.apply(ack_event("true_447700900002@c.us_3EB0B2", 3))
    assert sorted(d.get("ack") for d in store.messages.collection.find()) == [2, 3]


# -- odd bodies -----------------------------------------------------------------------------------


def signed(body: bytes) -> dict[str, Any]:
    signature = hmac.new(WEBHOOK_KEY.encode(), body, hashlib.sha512).hexdigest()
    return event_post(body, HTTP_X_WEBHOOK_HMAC=signature)


ODD = [
    b"[" * 100_000 + b"]" * 100_000,
    json.dumps(ack_event("true_447700900001@c.us_AB", 2**64)).encode(),
    json.dumps(ack_event("true_447700900001@c.us_AB", 7)).encode(),
    json.dumps({**ack_event("true_447700900001@c.us_AB", 2), "timestamp": 1e30}).encode(),
    b'{"event": "message", "session": "default", "payload": {"from": "447700900001@c.us", '
    b'"body": "\\ud800STOP", "fromMe": false}}',
    b'{"event": "message.ack", "payload": {"id": ["x"], "ack": 2}}',
    b'{"event": 5, "payload": {}}',
    b'{"event": "message", "session": "default", "payload": {"from": "447700900001@c.us", '
    b'"body": {"$gt": ""}, "fromMe": false}}',
    b"\xff\xfe",
]


@pytest.mark.parametrize("body", ODD, ids=range(len(ODD)))
def test_odd_bodies_get_400(store: Store, body: bytes) -> None:
    answer = receiver(store, max_bytes=1_000_000).handle(signed(body))
    assert answer.status == "400 Bad Request", answer


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
EVENTS = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["message.ack", "message", "message.ack.group", "session.status"]),
        "session": st.one_of(st.just("default"), JSON),
        "payload": st.dictionaries(
            st.sampled_from(["id", "ack", "from", "body", "fromMe", "timestamp", "_data"]), JSON
        ),
    },
    optional={"timestamp": JSON},
)


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(event=st.one_of(EVENTS, JSON))
def test_any_signed_body_gets_200_or_400_never_500(store: Store, event: Any) -> None:
    body = json.dumps(event).encode()
    assert receiver(store).handle(signed(body)).status in ("200 OK", "400 Bad Request")


# -- opt-outs: the words, the order, the chat -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("STOP", True),
        ("Stop.", True),
        ("STOP!", True),
        ("ＳＴＯＰ", True),
        ("stop 🛑", True),
        ("\u200bstop\u200d", True),
        ('"Stop"', True),
        ("👍🏽 unsubscribe!!", True),
        ("arrêt", True),
        ("stop it", False),
        ("S.T.O.P", False),
        ("don't stop", False),
        ("🛑", False),
    ],
)
def test_an_optout_keyword_as_people_type_it(store: Store, text: str, stops: bool) -> None:
    receiver(store).apply(message_event(PHONE, text))
    assert store.optouts.collection.count_documents(ACTIVE) == (1 if stops else 0)


def test_keywords_from_the_settings_are_folded_the_same_way() -> None:
    env = {"MONGODB_URI": "mongodb://localhost/db", "OPTOUT_KEYWORDS": " Stop!, ＡＲＲÊＴ,,"}
    assert Settings.from_env(env).optout_keywords == ("STOP", "ARRÊT")
    assert fold("Ｓtop 🛑") == "STOP"


EVENT_TIMES = st.lists(
    st.tuples(st.integers(min_value=0, max_value=50), st.booleans()),
    min_size=1,
    max_size=8,
    unique_by=lambda e: e[0],
)


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=EVENT_TIMES, order=st.randoms(use_true_random=False), replays=st.integers(0, 3))
def test_the_latest_optout_or_optin_wins_in_any_order_and_replayed(
    store: Store, events: list[tuple[int, bool]], order: Any, replays: int
) -> None:
    """STOP and START events at distinct times, posted in any order with some posted again:
    the chat ends as the latest one left it."""
    store.optouts.collection.delete_many({})
    base = time.time() - 3600
    posts = [message_event(PHONE, "STOP" if stop else "START", at=base + t) for t, stop in events]
    posts += [order.choice(posts) for _ in range(replays)]
    order.shuffle(posts)
    handler = receiver(store)
    for event in posts:
        handler.apply(event)
    latest_is_stop = max(events)[1]
    assert store.optouts.collection.count_documents(ACTIVE) == (1 if latest_is_stop else 0)


def test_a_late_start_does_not_undo_a_later_stop(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    handler = receiver(store)
    stop, start = time.time() - 60, time.time() - 120
    handler.apply(message_event(PHONE, "STOP", at=stop))
    handler.apply(message_event(PHONE, "START", at=start))  # happened first, arrived late
    store.messages.collection.insert_one(message(utcnow(), chat_id=PHONE))
    assert tick(store, client, 20).cancelled == 1 and waha.sent == []


def test_an_optout_the_web_app_writes_as_people_write_numbers_is_honoured(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    store.optouts.collection.insert_many(
        [
            {"session": "default", "chatId": "+44 7700 900134", "at": utcnow()},
            {"session": "default", "chatId": "not a number", "at": utcnow()},
        ]
    )
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id="447700900134@c.us"), message(now, chat_id="447700900135")]
    )
    assert tick(store, client, 20, now=now).cancelled == 1
    assert [m.chat_id for m in waha.sent] == ["447700900135@c.us"]
    keys = sorted(d["chatKey"] for d in store.optouts.collection.find())
    assert keys == ["", "447700900134@c.us"], "each normalised once, and not read again"


@pytest.mark.parametrize("source", ["event", "waha", "neither"])
def test_a_stop_from_an_lid_stops_its_phone_number(
    store: Store, client: WahaClient, waha: WahaSimulator, source: str
) -> None:
    lid = "240000000000001@lid"
    data = {"key": {"remoteJid": lid, "remoteJidAlt": "447700900001@s.whatsapp.net"}}
    if source == "waha":
        waha.lids[lid] = PHONE
    handler = receiver(store, phone_of=lambda session, chat: client.phone_of(session, chat))
    handler.apply(message_event(lid, "STOP", data=data if source == "event" else None))
    now = utcnow()
    store.messages.collection.insert_many([message(now, chat_id=PHONE), message(now, chat_id=lid)])
    counts = tick(store, client, 20, now=now)
    if source == "neither":
        assert counts.cancelled == 1 and [m.chat_id for m in waha.sent] == [PHONE]
    else:
        assert counts.cancelled == 2 and waha.sent == []
        docs = list(store.messages.collection.find())
        assert all(d["lastError"] == OPTED_OUT for d in docs)


def test_wahas_lid_route_is_asked_only_for_lids_and_missing_on_core(
    client: WahaClient, waha: WahaSimulator
) -> None:
    waha.lids["240000000000001@lid"] = PHONE
    assert client.phone_of("default", "240000000000001@lid") == PHONE
    assert client.phone_of("default", "240000000000009@lid") is None
    waha.core = True
    assert client.phone_of("default", "240000000000001@lid") is None


# -- secrets as a .env file leaves them -----------------------------------------------------------


@pytest.mark.parametrize("name", ["DASHBOARD_TOKEN", "WEBHOOK_SECRET", "WAHA_API_KEY"])
@pytest.mark.parametrize(
    "value",
    [
        "$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')",
        "${TOKEN}-and-more-text",
        "`openssl rand -hex 24`",
    ],
)
def test_a_secret_with_an_unexpanded_command_is_refused(name: str, value: str) -> None:
    env = {"MONGODB_URI": "mongodb://localhost/db", "HEALTH_PORT": "9108", name: value}
    with pytest.raises(ConfigError, match=name) as raised:
        Settings.from_env(env)
    assert value not in str(raised.value)


def test_a_mongodb_password_with_an_unexpanded_command_is_refused() -> None:
    with pytest.raises(ConfigError, match="MONGODB_URI's password"):
        Settings.from_env({"MONGODB_URI": "mongodb://u:$(cat%20pw)@localhost/db"})


def test_an_optout_mongodb_refuses_to_normalise_does_not_stop_the_tick(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    store.optouts.collection.insert_many(
        [
            {"session": "default", "chatId": "+44 7700 900134", "locked": True},
            {"session": "default", "chatId": "+44 7700 900135"},
        ]
    )
    optouts = store.optouts.collection
    refuses = {"$or": [{"locked": {"$ne": True}}, {"chatKey": {"$exists": False}}]}
    optouts.database.command("collMod", optouts.name, validator=refuses)
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=f"44770090013{n}") for n in (4, 5, 6)]
    )
    try:
        counts = tick(store, client, 20, now=now)
    finally:
        optouts.database.command("collMod", optouts.name, validator={})
    assert counts.cancelled == 2 and [m.chat_id for m in waha.sent] == ["447700900136@c.us"]
