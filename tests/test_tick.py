"""The tick against a real MongoDB server and the WAHA simulator: every outcome and edge."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from support import message, seconds, utcnow

from poller.settings import Settings
from poller.stats import Tally
from poller.store import Store
from poller.store.plans import NEW_INDEX, QUEUE_INDEX
from poller.testing.waha import Request, SentMessage, WahaSimulator, engine_error
from poller.tick import TickCounts, tick
from poller.waha import WahaClient


def run_tick(
    store: Store, settings: Settings, now: Any = None, stop: threading.Event | None = None
) -> TickCounts:
    client = WahaClient(settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds)
    try:
        return tick(store, client, settings.batch_size, now=now, stop=stop)
    finally:
        client.close()


def get(store: Store, message_id: Any) -> dict[str, Any]:
    doc = store.messages.collection.find_one({"_id": message_id})
    assert doc is not None
    return doc


def add(store: Store, **kwargs: Any) -> Any:
    scheduled = kwargs.pop("scheduled_at", utcnow())
    return store.messages.collection.insert_one(message(scheduled, **kwargs)).inserted_id


# -- sent -----------------------------------------------------------------------------------------


def test_due_message_is_sent_and_marked(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    message_id = add(store, scheduled_at=now - seconds(5), content="Reminder: 10:00")

    counts = run_tick(store, settings, now=now)

    assert (counts.claimed, counts.sent) == (1, 1)
    [sent] = waha.sent
    assert (sent.session, sent.chat_id, sent.text) == (
        "default",
        "447700900123@c.us",
        "Reminder: 10:00",
    )
    doc = get(store, message_id)
    assert doc["status"] == "sent" and doc["isSent"] is True and doc["isPicked"] is True
    assert doc["sentAt"] == now and doc["pickedAt"] == now
    assert doc["pickedBy"].startswith(settings.instance_id + "/")
    assert doc["wahaMessageId"] == sent.id
    assert doc["attempts"] == 1
    assert doc["lastError"] is None and "leaseUntil" not in doc
    listed, asked, request = waha.requests
    assert (listed.method, listed.path, listed.query) == ("GET", "/api/sessions", "all=true")
    assert asked.method == "GET" and asked.path == "/api/default/new-message-id"
    assert request.headers["X-Api-Key"] == settings.waha_api_key
    assert request.json() == {
        "session": "default",
        "chatId": "447700900123@c.us",
        "text": "Reminder: 10:00",
        "id": doc["sendId"],
    }
    assert sent.id.endswith("_" + doc["sendId"])


def test_a_sent_message_is_not_sent_again(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    add(store, scheduled_at=now)
    run_tick(store, settings, now=now)
    second = run_tick(store, settings, now=now + seconds(30))
    assert second.claimed == 0 and len(waha.sent) == 1


@pytest.mark.parametrize(
    ("chat_id", "expected"),
    [
        ("447700900123", "447700900123@c.us"),
        ("+44 7700 900123", "447700900123@c.us"),
        ("447700900123@s.whatsapp.net", "447700900123@c.us"),
        ("120363012345678901@g.us", "120363012345678901@g.us"),
        ("447700900123-1600000000@g.us", "447700900123-1600000000@g.us"),
        ("123456789012345@lid", "123456789012345@lid"),
        ("120363000000000001@newsletter", "120363000000000001@newsletter"),
    ],
)
def test_chat_ids_are_normalised(
    store: Store, settings: Settings, waha: WahaSimulator, chat_id: str, expected: str
) -> None:
    add(store, chat_id=chat_id)
    run_tick(store, settings)
    assert [m.chat_id for m in waha.sent] == [expected]


@pytest.mark.parametrize("as_string", [False, True])
def test_session_comes_from_the_session_document(
    store: Store, settings: Settings, waha: WahaSimulator, as_string: bool
) -> None:
    waha.sessions["sales"] = "WORKING"
    session_id = store.sessions.collection.insert_one({"name": "sales"}).inserted_id
    add(store, session=None, sessionId=str(session_id) if as_string else session_id)
    run_tick(store, settings)
    assert [m.session for m in waha.sent] == ["sales"]


# -- failed for good, before any request ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"chatId": "not-a-number"}, "chatId 'not-a-number' is not a WhatsApp id"),
        ({"chatId": "12@c.us"}, "is not a WhatsApp id"),
        ({"chatId": "status@broadcast"}, "is not a WhatsApp id"),
        ({"chatId": None}, "chatId None is not"),
        ({"content": ""}, "no text to send"),
        ({"content": "   "}, "no text to send"),
        ({"content": None}, "no text to send"),
        ({"session": None}, "names no WhatsApp session"),
        (
            {"session": None, "sessionId": ObjectId("0123456789abcdef01234567")},
            "matches no WhatsApp",
        ),
    ],
)
def test_bad_messages_fail_with_a_reason_and_no_request(
    store: Store, settings: Settings, waha: WahaSimulator, fields: dict[str, Any], reason: str
) -> None:
    doc = message(utcnow())
    doc.update(fields)
    if doc.get("session") is None:
        doc.pop("session")
    message_id = store.messages.collection.insert_one(doc).inserted_id

    counts = run_tick(store, settings)

    assert counts.failed == 1
    assert waha.message_requests() == []
    doc = get(store, message_id)
    assert doc["status"] == "failed" and doc["isSent"] is False
    assert reason in doc["lastError"]


# -- WAHA's answers -------------------------------------------------------------------------------


def test_wrong_api_key_stops_sending_and_leaves_messages_pending(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    settings = make_settings(waha_api_key="wrong-key")
    now = utcnow()
    ids = [add(store, scheduled_at=now, chat_id=f"4477009001{n:02d}") for n in range(3)]

    counts = run_tick(store, settings, now=now)

    assert counts.key_rejected and counts.sent == 0 and counts.failed == 0
    assert len(waha.requests) == 1, "no further request once the key was refused"
    for message_id in ids:
        doc = get(store, message_id)
        assert doc.get("status", "pending") == "pending"
        assert doc["isPicked"] is False and doc["isSent"] is False
        assert "leaseUntil" not in doc and "pickedBy" not in doc
    # Only this process's key is wrong: nothing shared says so (another poller may send);
    # its own counts, logs and heartbeat do.
    assert get(store, ids[0]).get("lastError") is None
    assert counts.servers[0]["keyAccepted"] is False
    assert get(store, ids[0]).get("attempts", 0) == 0, "the key was refused before any send"

    # With the right key the same messages go out on the next tick.
    counts = run_tick(store, make_settings(), now=now + seconds(30))
    assert counts.sent == 3


def test_a_session_waha_does_not_list_waits_without_a_request_then_sends(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.sessions.clear()
    now = utcnow()
    message_id = add(store, scheduled_at=now, session="sales", sessionId="ignored")

    counts = run_tick(store, settings, now=now)

    assert (counts.claimed, counts.retried, counts.held) == (0, 0, 0)
    assert waha.message_requests() == [], "no request, no pacing turn, no daily count"
    lane = store.turns.collection.find_one({"_id": "sales"})
    assert lane is not None and "nextAt" not in lane and "count" not in lane
    assert "WAHA has no WhatsApp session 'sales'" in lane["blocked"]
    doc = get(store, message_id)
    assert doc["isPicked"] is False and "status" not in doc
    assert "WAHA has no WhatsApp session 'sales' (its sessions: none)" in doc["lastError"]

    waha.sessions["sales"] = "WORKING"
    assert run_tick(store, settings, now=now + seconds(5)).sent == 1


def test_a_session_waha_cannot_find_when_sending_is_retried_with_backoff(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.sessions.clear()
    waha.listing_fails = 1  # the list is not known: each send's own answer counts
    now = utcnow()
    first, second = (
        add(store, scheduled_at=now),
        add(store, scheduled_at=now, chat_id="447700900999"),
    )

    counts = run_tick(store, settings, now=now)

    assert (counts.retried, counts.released, counts.sent) == (1, 1, 0)
    assert len(waha.message_requests()) == 1, "the session's other message waits unasked"
    doc = get(store, first)
    assert doc["status"] == "retry" and doc["isPicked"] is False
    retry = seconds(settings.retry_seconds)
    assert now + retry / 2 <= doc["retryAt"] <= now + retry
    assert "session 'default' is not started" in doc["lastError"]
    assert get(store, second)["status"] == "pending", "given back without a request"

    # Neither is tried while WAHA lists no such session ...
    assert run_tick(store, settings, now=now + retry / 4).claimed == 0
    # ... and sent once the session is up.
    waha.sessions["default"] = "WORKING"
    counts = run_tick(store, settings, now=now + retry)
    assert counts.sent == 2
    # attempts counts sendText requests: the 404 came when asking for a message id.
    assert get(store, first)["attempts"] == 1 and get(store, second)["attempts"] == 1


def test_a_session_not_working_waits_while_the_others_send(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.sessions.update(default="SCAN_QR_CODE", sales="WORKING")
    store.sessions.collection.insert_one({"_id": "s-default", "name": "default"})
    now = utcnow()
    waiting = [
        add(store, scheduled_at=now),
        add(store, scheduled_at=now, session=None, sessionId="s-default"),
    ]
    working = add(store, scheduled_at=now, session="sales")

    counts = run_tick(store, settings, now=now)

    assert (counts.claimed, counts.sent, counts.retried) == (1, 1, 0)
    assert [r.json()["session"] for r in waha.requests_to("/api/sendText")] == ["sales"]
    assert get(store, working)["status"] == "sent"
    for message_id in waiting:
        doc = get(store, message_id)
        assert doc["isPicked"] is False and "status" not in doc, "left unclaimed"
        assert doc["lastError"] == "WhatsApp session 'default' is SCAN_QR_CODE, not WORKING"

    waha.sessions["default"] = "WORKING"
    assert run_tick(store, settings, now=now + seconds(5)).sent == 2


def test_a_retried_message_expires_with_its_last_error_after_the_lookback(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.sessions["default"] = "STARTING"
    now = utcnow()
    message_id = add(store, scheduled_at=now)
    run_tick(store, settings, now=now)

    counts = run_tick(store, settings, now=now + seconds(settings.lookback_seconds + 1))

    assert counts.expired == 1
    doc = get(store, message_id)
    assert doc["status"] == "expired" and doc["isSent"] is False
    assert "more than 120 s past" in doc["lastError"]
    # It was never attempted: the session never became WORKING.
    assert "It was waiting: WhatsApp session 'default' is STARTING" in doc["lastError"]
    assert "Last attempt" not in doc["lastError"]


def test_engine_error_fails_and_is_never_resent(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.scripted["447700900123@c.us"] = engine_error("2 UNKNOWN: server returned error 463")
    now = utcnow()
    message_id = add(store, scheduled_at=now)

    counts = run_tick(store, settings, now=now)
    run_tick(store, settings, now=now + seconds(60))

    assert counts.failed == 1
    assert len(waha.requests_to("/api/sendText")) == 1
    doc = get(store, message_id)
    assert doc["status"] == "failed"
    assert "500: 2 UNKNOWN: server returned error 463" in doc["lastError"]
    assert "may have received it" in doc["lastError"]


def test_bad_request_fails(store: Store, settings: Settings, waha: WahaSimulator) -> None:
    waha.scripted["447700900123@c.us"] = (
        400,
        {"statusCode": 400, "message": "chatId must be a string", "error": "Bad Request"},
    )
    message_id = add(store)
    assert run_tick(store, settings).failed == 1
    assert (
        "WAHA refused the message (400: chatId must be a string)"
        in get(store, message_id)["lastError"]
    )


def test_waha_unreachable_leaves_messages_unclaimed(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    settings = make_settings()
    waha.stop()  # the port is closed now: connections are refused
    now = utcnow()
    ids = [add(store, scheduled_at=now), add(store, scheduled_at=now, chat_id="447700900999")]

    counts = run_tick(store, settings, now=now)

    assert counts.claimed == 0, "nothing is claimed while WAHA cannot list its sessions"
    for message_id in ids:
        doc = get(store, message_id)
        assert doc["isPicked"] is False and "could not be reached" in doc["lastError"]


def test_waha_timeout_is_retried(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    waha.latency = 1.5
    settings = make_settings(waha_timeout_seconds=0.5)
    message_id = add(store)
    counts = run_tick(store, settings)
    assert counts.retried == 1
    assert "did not answer in time" in get(store, message_id)["lastError"]


# -- what is claimed ------------------------------------------------------------------------------


def test_lookback_edges(store: Store, settings: Settings, waha: WahaSimulator) -> None:
    now = utcnow()
    lookback = seconds(settings.lookback_seconds)
    oldest = add(store, scheduled_at=now - lookback, chat_id="447700900001")
    too_old = add(store, scheduled_at=now - lookback - seconds(0.001), chat_id="447700900002")
    due_now = add(store, scheduled_at=now, chat_id="447700900003")
    future = add(store, scheduled_at=now + seconds(0.001), chat_id="447700900004")

    counts = run_tick(store, settings, now=now)

    assert (counts.sent, counts.expired) == (3 - 1, 1)
    assert get(store, oldest)["status"] == "sent"
    assert get(store, due_now)["status"] == "sent"
    expired = get(store, too_old)
    assert expired["status"] == "expired" and expired["isSent"] is False
    assert expired["lastError"].startswith("Not sent: it was more than 120 s past")
    assert get(store, future).get("status") is None
    assert sorted(m.chat_id for m in waha.sent) == ["447700900001@c.us", "447700900003@c.us"]


def test_flags_and_missing_flags(store: Store, settings: Settings, waha: WahaSimulator) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [
            {"scheduledAt": now, "chatId": "447700900001", "content": "x", "session": "default"},
            message(now, chat_id="447700900002", isSent=True),
            message(now, chat_id="447700900003", isDeleted=True),
            message(now, chat_id="447700900004", isPicked=True),
            message(now - seconds(600), chat_id="447700900005", isDeleted=True),
        ]
    )
    counts = run_tick(store, settings, now=now)
    assert counts.sent == 1 and counts.expired == 0
    assert [m.chat_id for m in waha.sent] == ["447700900001@c.us"]


def test_a_message_without_a_date_fails_instead_of_waiting_forever(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    undated = [
        {"scheduledAt": "2026-11-25T10:00:00Z", "chatId": "447700900001", "content": "x"},
        {"scheduledAt": 1795600000, "chatId": "447700900002", "content": "x"},
        {"chatId": "447700900003", "content": "x"},
    ]
    ids = store.messages.collection.insert_many(undated).inserted_ids
    store.messages.collection.insert_one(message(now, chat_id="447700900004"))

    counts = run_tick(store, settings, now=now)

    assert (counts.failed, counts.sent) == (3, 1)
    reasons = [get(store, i)["lastError"] for i in ids]
    assert [r.split(" but it is ")[1].split(",")[0] for r in reasons] == [
        "string",
        "int",
        "missing",
    ]
    assert all(get(store, i)["status"] == "failed" for i in ids)


def test_odd_yes_values_keep_a_message_back(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [
            message(now, chat_id="447700900001", isDeleted="true"),
            message(now, chat_id="447700900002", isDeleted=1),
            message(now, chat_id="447700900003", isSent=1),
            message(now - seconds(600), chat_id="447700900004", isSent="true"),
            message(now, chat_id="447700900005", isDeleted=0),
        ]
    )
    counts = run_tick(store, settings, now=now)
    assert (counts.sent, counts.expired) == (1, 0)
    assert [m.chat_id for m in waha.sent] == ["447700900005@c.us"]


def test_odd_references_fail_the_message_not_the_tick(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    bad_session = add(store, scheduled_at=now, session=None, sessionId={"$oid": "x"})
    bad_campaign = add(store, scheduled_at=now, chat_id="447700900002", campaignId=["a", "b"])
    good = add(store, scheduled_at=now, chat_id="447700900003")
    late = add(store, scheduled_at=now - seconds(600), campaignId={"nested": ["junk"]})

    counts = run_tick(store, settings, now=now)

    assert (counts.sent, counts.failed, counts.expired) == (2, 1, 1)
    assert get(store, late)["status"] == "expired"
    assert "is not an id" in get(store, bad_session)["lastError"]
    assert get(store, bad_campaign)["status"] == "sent" and get(store, good)["status"] == "sent"


def test_a_message_deleted_after_its_claim_is_not_sent(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    first = add(store, scheduled_at=now - seconds(1), chat_id="447700900001")
    second = add(store, scheduled_at=now, chat_id="447700900002")
    original = waha.validator

    def delete_second(request: Request) -> str | None:
        store.messages.collection.update_one({"_id": second}, {"$set": {"isDeleted": True}})
        return original(request) if original else None

    waha.validator = delete_second  # the web app deletes it while the first is being sent
    counts = run_tick(store, settings, now=now)

    assert counts.sent == 1 and [m.chat_id for m in waha.sent] == ["447700900001@c.us"]
    assert get(store, first)["status"] == "sent"
    # Done by the web app: out of the queue, with no status of the poller's.
    deleted = get(store, second)
    assert deleted["isPicked"] is True and deleted["isDeleted"] is True
    assert "plannedAt" not in deleted and deleted.get("status") in (None, "pending")


def test_plan_and_claim_queries_read_only_what_they_return(
    store: Store, settings: Settings
) -> None:
    """Finding new messages and a lane's due ones follow an index, past 50 sent messages and
    a lane of 50 planned for later."""
    now = utcnow()
    sent = [
        message(now - seconds(n), chat_id=f"4477009{n:05d}", isSent=True, isPicked=True)
        for n in range(50)
    ]
    later = [
        {**message(now, chat_id=f"4477019{n:05d}"), "lane": "default", "priority": 0}
        | {"plannedAt": now + seconds(60 + n)}
        for n in range(50)
    ]
    due = {**message(now, chat_id="447700900998"), "lane": "default", "priority": 0}
    due["plannedAt"] = now - seconds(1)
    new = message(now, chat_id="447700900999")
    store.messages.collection.insert_many([*sent, *later, due, new])

    queue_query = {"plannedAt": {"$lte": now}}
    new_query = {"lane": None, "isPicked": {"$ne": True}, "scheduledAt": {"$not": {"$gt": now}}}
    for query, hint in ((queue_query, QUEUE_INDEX), (new_query, NEW_INDEX)):
        explained = store.messages.collection.find(query).hint(hint).explain()
        text = str(explained["queryPlanner"]["winningPlan"])
        assert "IXSCAN" in text and "COLLSCAN" not in text
        assert explained["executionStats"]["totalDocsExamined"] == 1
    assert [d["_id"] for d in store.plans.planned(now, [], [], 5)] == [due["_id"]]
    assert [d["_id"] for d in store.plans.unplanned(now)] == [new["_id"]]


def test_claim_is_exclusive_between_two_pollers(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    now = utcnow()
    chats = [f"44770090{n:04d}@c.us" for n in range(60)]
    store.messages.collection.insert_many([message(now, chat_id=c) for c in chats])
    # Both with the same POLLER_INSTANCE_ID, as replicas sharing one .env would be.
    pollers = [
        make_settings(batch_size=7, instance_id="vps"),
        make_settings(batch_size=7, instance_id="vps"),
    ]
    start = threading.Barrier(2)
    results: list[TickCounts] = []

    def poll(settings: Settings) -> None:
        own = Store.connect(settings)
        start.wait()
        results.append(run_tick(own, settings, now=now))
        own.close()

    threads = [threading.Thread(target=poll, args=(s,)) for s in pollers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(m.chat_id for m in waha.sent) == sorted(chats), "each message exactly once"
    assert sum(r.sent for r in results) == 60
    assert not any(t.is_alive() for t in threads)
    owners = {d["pickedBy"].split("/")[0] for d in store.messages.collection.find()}
    assert owners <= {s.instance_id for s in pollers}


def test_a_claim_lost_between_find_and_update_is_not_taken(
    store: Store, make_settings: Callable[..., Settings]
) -> None:
    """The race the conditional update is for: a rival claims between our find and update."""
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id=f"4477009000{n:02d}") for n in range(5)]
    )
    rival = Store.connect(make_settings())
    rival_took: list[dict[str, Any]] = []
    real = store.messages.collection

    ids = [d["_id"] for d in store.messages.collection.find()]
    store.messages.collection.update_many({}, {"$set": {"lane": "default", "plannedAt": now}})

    class RivalFirst:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def update_many(self, *args: Any, **kwargs: Any) -> Any:
            if not rival_took:
                rival_took.extend(rival.messages.claim(ids, now))
            return real.update_many(*args, **kwargs)

    store.messages.collection = RivalFirst()  # type: ignore[assignment]
    try:
        taken = store.messages.claim(ids, now)
    finally:
        store.messages.collection = real
        rival.close()
    assert len(rival_took) == 5
    assert taken == []


# -- leases and stopping --------------------------------------------------------------------------


def test_claims_of_a_dead_poller_are_taken_over(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    message_id = add(
        store,
        scheduled_at=now - seconds(100),
        isPicked=True,
        status="claimed",
        pickedBy="dead-poller",
        pickedAt=now - seconds(100),
        leaseUntil=now - seconds(1),
    )
    counts = run_tick(store, settings, now=now)
    assert counts.sent == 1
    assert get(store, message_id)["pickedBy"].startswith(settings.instance_id + "/")


def test_live_claims_of_another_poller_are_left_alone(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    add(
        store,
        scheduled_at=now,
        isPicked=True,
        status="claimed",
        pickedBy="other",
        pickedAt=now,
        leaseUntil=now + seconds(60),
    )
    assert run_tick(store, settings, now=now).claimed == 0
    assert waha.message_requests() == []


def test_claims_abandoned_too_long_expire_or_end_unknown_when_in_doubt(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    limit = settings.lookback_seconds  # never sent more than the lookback window late
    dead = {"isPicked": True, "pickedBy": "dead-poller", "leaseUntil": now - seconds(1)}
    too_late = now - seconds(limit + 1)
    claimed = add(store, scheduled_at=too_late, status="claimed", **dead)
    # Taken over once from a send in flight, then its new poller died too.
    doubtful = add(store, scheduled_at=too_late, status="claimed", inDoubt=True, **dead)
    sending = add(store, scheduled_at=too_late, status="sending", sendId="AB12", **dead)
    in_time = add(store, scheduled_at=now - seconds(limit - 5), status="claimed", **dead)

    counts = run_tick(store, settings, now=now)

    assert (counts.expired, counts.unknown, counts.sent) == (1, 2, 1)
    doc = get(store, claimed)
    assert doc["status"] == "expired" and "no poller took it over in time" in doc["lastError"]
    for message_id in (doubtful, sending):
        doc = get(store, message_id)
        assert doc["status"] == "unknown" and "check the chat" in doc["lastError"].lower()
    assert get(store, in_time)["status"] == "sent"
    assert len(waha.sent) == 1


def test_a_message_that_timed_out_and_then_expired_ends_unknown(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    # 5 s: the message id must still come back in time on a busy machine; the send may not.
    settings = make_settings(waha_timeout_seconds=5)
    waha.slow_sessions["default"] = 10  # delivered, answered too late
    now = utcnow()
    message_id = add(store, scheduled_at=now)
    assert run_tick(store, settings, now=now).retried == 1
    waha.sessions["default"] = "STARTING"  # it cannot be tried again in time

    counts = run_tick(store, settings, now=now + seconds(settings.lookback_seconds + 1))

    assert counts.unknown == 1 and len(waha.sent) == 1
    doc = get(store, message_id)
    assert doc["status"] == "unknown" and "may have reached WhatsApp" in doc["lastError"]


def test_a_live_send_of_another_poller_is_left_alone(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    live = {"isPicked": True, "pickedBy": "other", "leaseUntil": now + seconds(30)}
    message_id = add(store, scheduled_at=now, status="sending", sendId="AB12", **live)
    counts = run_tick(store, settings, now=now)
    assert (counts.claimed, counts.unknown) == (0, 0)
    assert get(store, message_id)["status"] == "sending" and waha.message_requests() == []


def test_claims_of_a_paused_session_are_not_taken_over(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.sessions["default"] = "SCAN_QR_CODE"
    now = utcnow()
    dead = {"isPicked": True, "pickedBy": "dead-poller", "leaseUntil": now - seconds(1)}
    message_id = add(store, scheduled_at=now, status="claimed", **dead)
    assert run_tick(store, settings, now=now).claimed == 0
    doc = get(store, message_id)  # back to wait, as planned
    assert doc["isPicked"] is False and doc["status"] == "pending" and "pickedBy" not in doc
    waha.sessions["default"] = "WORKING"
    assert run_tick(store, settings, now=now + seconds(1)).sent == 1


def test_session_names_the_session_even_with_a_session_id(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.sessions["sales"] = "SCAN_QR_CODE"
    store.sessions.collection.insert_one({"_id": "s-sales", "name": "sales"})
    message_id = add(store, session="default", sessionId="s-sales")
    assert run_tick(store, settings).sent == 1
    assert waha.sent[0].session == "default" and get(store, message_id)["status"] == "sent"


def test_a_document_mongodb_refuses_to_update_fails_alone(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    poison = add(store, scheduled_at=now - seconds(1), attempts="x")  # $inc cannot count it
    fine = add(store, scheduled_at=now, chat_id="447700900999")
    counts = run_tick(store, settings, now=now)
    assert (counts.failed, counts.sent) == (1, 1)
    doc = get(store, poison)
    assert doc["status"] == "failed" and "MongoDB refused to update" in doc["lastError"]
    assert get(store, fine)["status"] == "sent" and len(waha.sent) == 1


def test_a_send_interrupted_by_a_crash_is_unknown_not_resent(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    message_id = add(
        store,
        scheduled_at=now - seconds(30),
        isPicked=True,
        status="sending",
        pickedBy="dead-poller",
        attempts=1,
        leaseUntil=now - seconds(1),
    )
    counts = run_tick(store, settings, now=now)
    assert counts.unknown == 1 and waha.message_requests() == []
    doc = get(store, message_id)
    assert doc["status"] == "unknown" and doc["isSent"] is False
    assert "may or may not have been delivered" in doc["lastError"]


def test_a_send_interrupted_by_a_crash_under_a_message_id_is_sent_again_once(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    delivered, lost = "AAAA0000BBBB1111", "CCCC2222DDDD3333"
    # The dead poller's first request reached WhatsApp; its second never left the host.
    waha.sent.append(
        SentMessage(
            f"true_447700900123@c.us_{delivered}", "default", "447700900123@c.us", "Hello", 0.0
        )
    )
    ids = [
        add(
            store,
            scheduled_at=now - seconds(30),
            isPicked=True,
            status="sending",
            pickedBy="dead-poller",
            attempts=1,
            sendId=send_id,
            leaseUntil=now - seconds(1),
        )
        for send_id in (delivered, lost)
    ]
    counts = run_tick(store, settings, now=now)
    assert (counts.claimed, counts.sent, counts.unknown) == (2, 2, 0)
    assert sorted(m.id.rsplit("_", 1)[1] for m in waha.sent) == [delivered, lost]
    for message_id in ids:
        doc = get(store, message_id)
        assert doc["status"] == "sent" and doc["attempts"] == 2
    assert waha.requests_to("/api/default/new-message-id") == [], "the old ids are kept"


def test_claims_left_by_a_failed_tick_are_taken_up_by_the_next(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    held = {"isPicked": True, "pickedBy": store.owner, "leaseUntil": now + seconds(100)}
    claimed = add(store, scheduled_at=now, status="claimed", **held)
    in_doubt = add(store, scheduled_at=now, chat_id="447700900999", status="sending", **held)
    counts = run_tick(store, settings, now=now + seconds(1))
    assert (counts.sent, counts.unknown) == (1, 1)
    assert get(store, claimed)["status"] == "sent"
    assert get(store, in_doubt)["status"] == "unknown", "sent without an id: not sent again"
    assert [m.chat_id for m in waha.sent] == ["447700900123@c.us"]


def test_a_slow_send_given_up_as_unknown_still_records_its_success(
    store: Store, settings: Settings
) -> None:
    now = utcnow()
    message_id = add(
        store,
        scheduled_at=now,
        isPicked=True,
        status="unknown",
        pickedBy=store.owner,
        lastError="may or may not",
    )
    assert store.messages.sent(message_id, "true_x_1", now, Tally())
    doc = get(store, message_id)
    assert doc["status"] == "sent" and doc["isSent"] is True and doc["lastError"] is None


def test_stop_finishes_the_message_in_flight_and_releases_the_rest(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    stop = threading.Event()
    original = waha.validator

    def stop_on_first_request(request: Request) -> str | None:
        if request.path != "/api/sessions":
            stop.set()  # as if SIGTERM arrived while this request is in flight
        return original(request) if original else None

    waha.validator = stop_on_first_request
    now = utcnow()
    ids = [
        add(store, scheduled_at=now + seconds(-n), chat_id=f"4477009000{n:02d}") for n in range(4)
    ]

    counts = run_tick(store, settings, now=now, stop=stop)

    assert (counts.claimed, counts.sent, counts.released) == (4, 1, 3)
    statuses = sorted(get(store, i)["status"] for i in ids)
    assert statuses == ["pending", "pending", "pending", "sent"]
    for doc in store.messages.collection.find({"status": "pending"}):
        assert doc["isPicked"] is False and "pickedBy" not in doc and "leaseUntil" not in doc


def test_long_batches_renew_their_lease(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    """A clock that moves a second with each WAHA request: ten messages take twenty seconds, five
    times a four-second lease, and no claim still held ever lapses."""
    settings = make_settings(lease_seconds=4.0)
    now = utcnow()
    for n in range(10):
        add(store, scheduled_at=now, chat_id=f"4477009000{n:02d}")
    clock = [now]
    seen: list[Any] = []
    original = waha.validator

    def watch_leases(request: Request) -> str | None:
        # Every claim this poller still holds must have a live lease while it works.
        clock[0] += seconds(1)
        lapsed = store.messages.collection.count_documents(
            {"status": "claimed", "leaseUntil": {"$lt": clock[0]}}
        )
        seen.append(lapsed)
        return original(request) if original else None

    waha.validator = watch_leases
    short_leases = Store.connect(settings)
    client = WahaClient(settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds)
    try:
        counts = tick(short_leases, client, settings.batch_size, clock=lambda: clock[0])
    finally:
        client.close()
        short_leases.close()
    assert counts.sent == 10
    assert len(seen) == 21 and set(seen) == {0}  # the sessions, then an id and a send for each


# -- campaigns ------------------------------------------------------------------------------------


def test_campaign_rollup(store: Store, settings: Settings, waha: WahaSimulator) -> None:
    now = utcnow()
    campaign = store.campaigns.collection.insert_one(
        {"name": "Sale", "status": "running"}
    ).inserted_id
    add(store, scheduled_at=now, campaignId=campaign, chat_id="447700900001")
    add(store, scheduled_at=now, campaignId=campaign, chat_id="447700900002")
    add(store, scheduled_at=now + seconds(60), campaignId=campaign, chat_id="447700900003")
    add(store, scheduled_at=now, campaignId=campaign, chat_id="447700900004", isDeleted=True)

    run_tick(store, settings, now=now)
    doc = store.campaigns.collection.find_one({"_id": campaign})
    assert doc is not None
    assert doc["status"] == "running"
    assert doc["stats"] == {
        "total": 3,
        "sent": 2,
        "failed": 0,
        "expired": 0,
        "unknown": 0,
        "cancelled": 0,
        "delivered": 0,
        "read": 0,
        "deliveryFailed": 0,
    }

    run_tick(store, settings, now=now + seconds(60))
    doc = store.campaigns.collection.find_one({"_id": campaign})
    assert doc is not None
    assert doc["status"] == "completed" and doc["completedAt"] == now + seconds(60)
    assert doc["stats"] == {
        "total": 3,
        "sent": 3,
        "failed": 0,
        "expired": 0,
        "unknown": 0,
        "cancelled": 0,
        "delivered": 0,
        "read": 0,
        "deliveryFailed": 0,
    }


def test_campaign_with_failures(store: Store, settings: Settings, waha: WahaSimulator) -> None:
    now = utcnow()
    campaign = str(
        store.campaigns.collection.insert_one({"name": "Sale"}).inserted_id
    )  # referenced as a string
    add(store, scheduled_at=now, campaignId=campaign, chat_id="447700900001")
    add(store, scheduled_at=now, campaignId=campaign, chat_id="bad")
    add(store, scheduled_at=now - seconds(600), campaignId=campaign, chat_id="447700900003")

    run_tick(store, settings, now=now)

    doc = store.campaigns.collection.find_one({"_id": ObjectId(campaign)})
    assert doc is not None
    assert doc["status"] == "completed_with_failures"
    assert doc["stats"] == {
        "total": 3,
        "sent": 1,
        "failed": 1,
        "expired": 1,
        "unknown": 0,
        "cancelled": 0,
        "delivered": 0,
        "read": 0,
        "deliveryFailed": 0,
    }


def test_campaign_referenced_both_ways_is_counted_whole(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    campaign = store.campaigns.collection.insert_one({"name": "Sale"}).inserted_id
    add(store, scheduled_at=now, campaignId=campaign, chat_id="447700900001")
    add(store, scheduled_at=now + seconds(60), campaignId=str(campaign), chat_id="447700900002")
    run_tick(store, settings, now=now)
    doc = store.campaigns.collection.find_one({"_id": campaign})
    assert doc is not None and "status" not in doc
    assert doc["stats"]["total"] == 2 and doc["stats"]["sent"] == 1


def test_finished_campaign_is_not_rewritten(store: Store, settings: Settings) -> None:
    campaign = store.campaigns.collection.insert_one(
        {"status": "completed", "stats": {"total": 9}}
    ).inserted_id
    add(store, campaignId=campaign)
    run_tick(store, settings)
    doc = store.campaigns.collection.find_one({"_id": campaign})
    assert doc is not None and doc["stats"] == {"total": 9}


# -- idempotent retries ----------------------------------------------------------------------------


def test_a_timed_out_send_is_retried_under_the_same_id_and_delivered_once(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    # 5 s: the message id must still come back in time on a busy machine; the send may not.
    settings = make_settings(waha_timeout_seconds=5)
    waha.stall_after_send.add("447700900123@c.us")
    waha.stall = 10  # WAHA delivers, then answers after the poller gave up waiting
    now = utcnow()
    message_id = add(store, scheduled_at=now)

    first = run_tick(store, settings, now=now)
    doc = get(store, message_id)
    assert first.retried == 1 and doc["status"] == "retry"
    assert "did not answer in time" in doc["lastError"]

    patient = make_settings()  # the retry must not time out too on a busy machine
    second = run_tick(store, patient, now=now + seconds(settings.retry_seconds))

    assert second.sent == 1
    sends = waha.requests_to("/api/sendText")
    assert len(sends) == 2 and sends[0].json()["id"] == sends[1].json()["id"] == doc["sendId"]
    assert len(waha.sent) == 1, "WhatsApp got it once"
    doc = get(store, message_id)
    assert doc["status"] == "sent" and doc["wahaMessageId"] == waha.sent[0].id
    assert doc["attempts"] == 2


def test_without_message_ids_a_timed_out_send_is_unknown_not_resent(
    store: Store, make_settings: Callable[..., Settings], waha: WahaSimulator
) -> None:
    settings = make_settings(waha_timeout_seconds=5)  # as above
    waha.message_ids = False  # an older WAHA
    waha.stall_after_send.add("447700900123@c.us")
    waha.stall = 10
    now = utcnow()
    message_id = add(store, scheduled_at=now)

    counts = run_tick(store, settings, now=now)
    run_tick(store, settings, now=now + seconds(60))

    assert counts.unknown == 1
    doc = get(store, message_id)
    assert doc["status"] == "unknown" and "sendId" not in doc
    assert "cannot pre-generate message ids" in doc["lastError"]
    assert len(waha.requests_to("/api/sendText")) == 1 and len(waha.sent) == 1


def test_without_message_ids_messages_still_go_out(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    waha.message_ids = False
    now = utcnow()
    for n in range(3):
        add(store, scheduled_at=now, chat_id=f"4477009000{n:02d}")
    counts = run_tick(store, settings, now=now)
    assert counts.sent == 3
    assert len(waha.requests_to("/api/default/new-message-id")) == 1, "asked once, then remembered"
    assert all("id" not in r.json() for r in waha.requests_to("/api/sendText"))
