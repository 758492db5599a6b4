"""A message's life from insert to a final status, against defects found from the outside:
each test here failed on the core these rules replaced."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
from support import message, seconds, utcnow

from poller.context import Memory
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import WahaSimulator
from poller.tick import TickCounts, tick
from poller.waha import WahaClient


def run_tick(store: Store, settings: Settings, now: datetime, **options: Any) -> TickCounts:
    client = WahaClient(settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds)
    try:
        return tick(store, client, settings.batch_size, now=now, **options)
    finally:
        client.close()


def campaign(store: Store, status: str = "running") -> Any:
    return store.campaigns.collection.insert_one({"name": "Sale", "status": status}).inserted_id


def doc(store: Store, collection: str, _id: Any) -> dict[str, Any]:
    found = store.db[collection].find_one({"_id": _id})
    assert found is not None
    return found


def get(store: Store, message_id: Any) -> dict[str, Any]:
    return doc(store, store.messages.collection.name, message_id)


# -- paused, then resumed -------------------------------------------------------------------------


class PauseAfterClaim:
    """The messages collection, as the poller sees it, except that the web app pauses the
    campaign right after the poller's claim and before it sends (two clicks on the dashboard:
    the resume comes before the next tick)."""

    def __init__(self, store: Store, campaign_id: Any) -> None:
        self.real, self.store, self.campaign_id, self.paused = (
            store.messages.collection,
            store,
            campaign_id,
            False,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def update_many(self, query: Any, update: Any, *args: Any, **kwargs: Any) -> Any:
        result = self.real.update_many(query, update, *args, **kwargs)
        claim = isinstance(update, list) and update[0].get("$set", {}).get("isPicked") is True
        if claim and not self.paused:
            self.paused = True
            self.store.campaigns.collection.update_one(
                {"_id": self.campaign_id}, {"$set": {"status": "paused"}}
            )
        return result


def test_a_message_paused_after_its_claim_and_resumed_is_sent_and_completes(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    campaign_id = campaign(store)
    message_id = store.messages.collection.insert_one(
        message(now, campaignId=campaign_id)
    ).inserted_id
    real = store.messages.collection
    store.messages.collection = PauseAfterClaim(store, campaign_id)  # type: ignore[assignment]
    try:
        first = run_tick(store, settings, now)
    finally:
        store.messages.collection = real
    assert first.sent == 0 and first.released == 1
    store.campaigns.collection.update_one({"_id": campaign_id}, {"$set": {"status": "running"}})

    for n in range(1, 4):
        run_tick(store, settings, now + seconds(n))

    assert get(store, message_id)["status"] == "sent" and len(waha.sent) == 1
    done = doc(store, "campaigns", campaign_id)
    assert done["status"] == "completed" and done["stats"]["sent"] == 1


def test_a_paused_message_keeps_its_place_and_never_expires(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    campaign_id = campaign(store, "paused")
    message_id = store.messages.collection.insert_one(
        message(now, campaignId=campaign_id)
    ).inserted_id
    run_tick(store, settings, now)
    later = now + seconds(settings.lookback_seconds * 3)
    assert run_tick(store, settings, later).expired == 0
    assert get(store, message_id).get("status") in (None, "pending")
    store.campaigns.collection.update_one({"_id": campaign_id}, {"$set": {"status": "running"}})

    assert run_tick(store, settings, later + seconds(1)).sent == 1
    assert doc(store, "campaigns", campaign_id)["status"] == "completed"


def test_a_message_already_too_late_when_first_seen_expires_though_its_campaign_is_paused(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    """Written 200 s past its scheduledAt into a paused campaign: it was never sendable in
    time, so it expires when first seen, and the resume does not send it."""
    now = utcnow()
    campaign_id = campaign(store, "paused")
    message_id = store.messages.collection.insert_one(
        message(now - seconds(200), campaignId=campaign_id)
    ).inserted_id
    assert run_tick(store, settings, now).expired == 1
    store.campaigns.collection.update_one({"_id": campaign_id}, {"$set": {"status": "running"}})

    assert run_tick(store, settings, now + seconds(600)).sent == 0
    assert get(store, message_id)["status"] == "expired" and waha.sent == []


# -- one definition of done ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags", [{"isSent": True}, {"isDeleted": 1}, {"isDeleted": "true"}, {"isSent": 1}]
)
def test_a_message_the_web_app_marked_done_lets_its_campaign_complete(
    store: Store, settings: Settings, waha: WahaSimulator, flags: dict[str, Any]
) -> None:
    now = utcnow()
    campaign_id = campaign(store)
    store.messages.collection.insert_many(
        [
            message(now, campaignId=campaign_id, chat_id="447700900001"),
            message(now + seconds(5), campaignId=campaign_id, chat_id="447700900002"),
        ]
    )
    run_tick(store, settings, now)
    store.messages.collection.update_one({"chatId": "447700900002"}, {"$set": flags})

    run_tick(store, settings, now + seconds(6))

    done = doc(store, "campaigns", campaign_id)
    assert done["status"] == "completed" and "completedAt" in done
    deleted = "isDeleted" in flags
    assert done["stats"]["total"] == (1 if deleted else 2)
    assert done["stats"]["sent"] == (1 if deleted else 2)
    assert len(waha.sent) == 1


def test_deleting_a_campaigns_last_open_message_completes_it_within_one_interval(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    campaign_id = campaign(store)
    memory = Memory()
    store.messages.collection.insert_many(
        [
            message(now, campaignId=campaign_id, chat_id="447700900001"),
            message(now + seconds(600), campaignId=campaign_id, chat_id="447700900002"),
        ]
    )
    run_tick(store, settings, now, memory=memory)
    assert doc(store, "campaigns", campaign_id)["status"] == "running"
    store.messages.collection.delete_one({"chatId": "447700900002"})

    run_tick(store, settings, now + seconds(settings.poll_interval_seconds), memory=memory)

    done = doc(store, "campaigns", campaign_id)
    assert done["status"] == "completed" and done["stats"]["total"] == 1


# -- the lookback window -------------------------------------------------------------------------


def test_without_pacing_a_message_is_never_sent_past_its_scheduled_time_and_the_window(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    """The session cannot send for a while: once it can again, what is more than the lookback
    window past its scheduledAt expires, and what is not yet is sent."""
    now = utcnow()
    waha.sessions["default"] = "STARTING"
    early = store.messages.collection.insert_one(
        message(now - seconds(10), chat_id="447700900001")
    ).inserted_id
    fresh = store.messages.collection.insert_one(
        message(now + seconds(60), chat_id="447700900002")
    ).inserted_id
    run_tick(store, settings, now)
    run_tick(store, settings, now + seconds(61))
    waha.sessions["default"] = "WORKING"

    at = now + seconds(settings.lookback_seconds - 10 + 1)  # 1 s past the early one's window
    counts = run_tick(store, settings, at)

    assert counts.sent == 1 and counts.expired == 1
    assert get(store, early)["status"] == "expired"
    assert get(store, fresh)["status"] == "sent"
    assert [m.chat_id for m in waha.sent] == ["447700900002@c.us"]


@pytest.mark.parametrize(
    ("due", "retried"),
    [
        # Seen 100 s after its scheduledAt, tried at once, refused for now: 30 s later it is past
        # the window of its scheduledAt (not of the time it was first seen).
        (-100, 30),
        # Due now, refused for now: its retry comes past the window.
        (0, 149),
    ],
)
def test_a_retry_is_never_sent_past_the_window_of_its_scheduled_time(
    store: Store, settings: Settings, waha: WahaSimulator, due: float, retried: float
) -> None:
    now = utcnow()
    ids = "/api/default/new-message-id"
    waha.raw_answers[ids] = (503, "application/json", '{"message": "Service Unavailable"}')
    message_id = store.messages.collection.insert_one(message(now + seconds(due))).inserted_id
    assert run_tick(store, settings, now).retried == 1
    del waha.raw_answers[ids]

    counts = run_tick(store, settings, now + seconds(retried))

    assert counts.sent == 0 and get(store, message_id)["status"] == "expired"
    assert waha.sent == []


def test_a_message_first_seen_too_late_expires_at_once(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    message_id = store.messages.collection.insert_one(
        message(now - seconds(settings.lookback_seconds + 1))
    ).inserted_id
    assert run_tick(store, settings, now).expired == 1
    assert get(store, message_id)["status"] == "expired" and waha.sent == []


# -- wake-ups ------------------------------------------------------------------------------------


def test_a_message_that_comes_due_during_a_tick_makes_the_next_come_at_once(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    """Due two seconds after the tick read the new messages, before its last claim: the tick
    asks to run again at once, not at the next timer."""
    now = utcnow()
    store.messages.collection.insert_one(message(now, chat_id="447700900001"))
    store.messages.collection.insert_one(message(now + seconds(2), chat_id="447700900002"))
    times = iter([now] * 8)

    counts = run_tick(store, settings, now, clock=lambda: next(times, now + seconds(5)))

    assert counts.sent == 1
    assert counts.next_at is not None and counts.next_at <= now + seconds(2)


# -- what a tick costs ---------------------------------------------------------------------------


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def counted(settings: Settings) -> Iterator[tuple[Store, Commands]]:
    commands = Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(
        settings.mongodb_uri, tz_aware=True, event_listeners=[commands]
    )
    store = Store(client, settings)
    store.ensure_indexes()
    yield store, commands
    client.close()


@pytest.mark.parametrize("lanes", [0, 200])
def test_an_idle_tick_costs_the_same_few_commands_however_many_lanes(
    counted: tuple[Store, Commands],
    make_settings: Callable[..., Settings],
    waha: WahaSimulator,
    lanes: int,
) -> None:
    store, commands = counted
    settings = make_settings(pacing_min_seconds=10.0, pacing_max_seconds=25.0)
    if lanes:
        store.turns.collection.insert_many([{"_id": f"session-{n}"} for n in range(lanes)])
    now = utcnow()
    memory = Memory()
    run_tick(store, settings, now, memory=memory)  # the first tick of a process upgrades
    commands.names.clear()

    run_tick(store, settings, now + seconds(settings.poll_interval_seconds), memory=memory)

    assert len(commands.names) <= 6, commands.names


# -- one document at a time ------------------------------------------------------------------------


def test_a_late_message_mongodb_refuses_to_settle_does_not_stop_the_rest(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    """A collection validator (the web app's schema) refuses to mark one message expired: the
    others beside it are settled and sent as usual, and the tick goes on."""
    now = utcnow()
    late = now - seconds(settings.lookback_seconds + 60)
    store.messages.collection.insert_many(
        [
            message(late, chat_id="447700900001"),
            message(late, chat_id="447700900666"),
            message(now, chat_id="447700900002"),
        ]
    )
    refuses = {"$or": [{"chatId": {"$ne": "447700900666"}}, {"status": {"$ne": "expired"}}]}
    collection = store.messages.collection
    collection.database.command("collMod", collection.name, validator=refuses)
    try:
        counts = run_tick(store, settings, now)
    finally:
        collection.database.command("collMod", collection.name, validator={})

    assert (counts.expired, counts.sent) == (1, 1)
    assert [m.chat_id for m in waha.sent] == ["447700900002@c.us"]
    assert collection.find_one({"chatId": "447700900001"})["status"] == "expired"
    assert collection.find_one({"chatId": "447700900666"}).get("status") is None


def test_a_message_mongodb_refuses_to_claim_does_not_stop_the_rest(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [message(now, chat_id="447700900666"), message(now, chat_id="447700900002")]
    )
    refuses = {"$or": [{"chatId": {"$ne": "447700900666"}}, {"isPicked": {"$ne": True}}]}
    collection = store.messages.collection
    collection.database.command("collMod", collection.name, validator=refuses)
    try:
        counts = run_tick(store, settings, now)
    finally:
        collection.database.command("collMod", collection.name, validator={})

    assert counts.sent == 1 and [m.chat_id for m in waha.sent] == ["447700900002@c.us"]
    assert collection.find_one({"chatId": "447700900666"})["isPicked"] is False


# -- upgrading -----------------------------------------------------------------------------------


def test_what_the_previous_version_left_is_sent(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    """The previous version took a paused campaign's messages out of the plan (a lane, no
    plannedAt, `heldAt` on the campaign), stranded a claim it gave back while a campaign was
    paused (a lane, no plannedAt, no `heldAt`), and versions before it held messages back with
    `heldUntil`: each is sent by this version."""
    now = utcnow()
    held = store.campaigns.collection.insert_one(
        {"name": "Held", "status": "paused", "heldAt": now - seconds(600), "stats": {"total": 1}}
    ).inserted_id
    resumed = campaign(store)
    old = now - seconds(900)
    store.messages.collection.insert_many(
        [
            message(old, chat_id="447700900001", campaignId=held, lane="default", priority=0),
            message(old, chat_id="447700900002", campaignId=resumed, lane="default", priority=0),
            message(old, chat_id="447700900003", heldUntil=now - seconds(5)),
        ]
    )

    first = run_tick(store, settings, now)
    assert first.sent == 2 and first.expired == 0
    store.campaigns.collection.update_one({"_id": held}, {"$set": {"status": "running"}})
    assert run_tick(store, settings, now + seconds(1)).sent == 1

    assert sorted(m.chat_id for m in waha.sent) == [f"44770090000{n}@c.us" for n in (1, 2, 3)]
    for campaign_id in (held, resumed):
        assert doc(store, "campaigns", campaign_id)["status"] == "completed"


def test_a_send_in_doubt_whose_chat_opted_out_ends_unknown_not_cancelled(
    store: Store, settings: Settings, waha: WahaSimulator
) -> None:
    """A poller died while WAHA delivered the message; the chat opts out before it is taken
    over: it may have reached WhatsApp, so it is not "not sent"."""
    now = utcnow()
    message_id = store.messages.collection.insert_one(
        message(
            now - seconds(5),
            isPicked=True,
            status="sending",
            sendId="AB12",
            pickedBy="dead-poller",
            pickedAt=now - seconds(5),
            leaseUntil=now - seconds(1),
            lane="default",
            plannedAt=now - seconds(5),
        )
    ).inserted_id
    store.optouts.add("default", "447700900123@c.us", now, "STOP")

    counts = run_tick(store, settings, now)

    assert (counts.unknown, counts.cancelled) == (1, 0) and waha.sent == []
    doc_ = get(store, message_id)
    assert doc_["status"] == "unknown" and "opted out" in doc_["lastError"]
