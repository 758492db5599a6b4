"""Recurring schedules: each occurrence of a definition becomes one campaign with one message
per target, exactly once, through crashes and replicas; missed occurrences are recorded; edits
apply to what is not yet materialised; a bad definition says why and stops nothing else.

The ticks run on a fake clock (`now=`)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from support import environment, replicas, seconds, utcnow, wait_until

from poller import schedules, status
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import WahaSimulator
from poller.tick import TickCounts, tick
from poller.waha import WahaClient

LONDON = ZoneInfo("Europe/London")
# Monday 30 November 2026, 09:00 in London (GMT).
MONDAY_9 = datetime(2026, 11, 30, 9, tzinfo=UTC)
TARGETS = ["447700900001", "120363000000000001@g.us", "+44 7700 900001", "447700900002@c.us"]


def define(store: Store, **fields: Any) -> Any:
    """A definition as the web app writes it: weekly menu, Mondays 09:00 London."""
    doc: dict[str, Any] = {
        "name": "Weekly menu",
        "cron": "0 9 * * 1",
        "timezone": "Europe/London",
        "content": "This week's menu",
        "targets": TARGETS,
        "session": "default",
        "isActive": True,
        "createdAt": MONDAY_9 - timedelta(days=3),
    }
    doc.update(fields)
    return store.definitions.collection.insert_one(doc).inserted_id


def run(store: Store, client: WahaClient, now: datetime) -> TickCounts:
    return tick(store, client, 20, now=now, pacing=Pacing(zone=LONDON))


def definition(store: Store, definition_id: Any) -> dict[str, Any]:
    found = store.definitions.collection.find_one({"_id": definition_id})
    assert found is not None
    return found


def campaigns(store: Store) -> list[dict[str, Any]]:
    return list(store.campaigns.collection.find().sort("occurrenceAt", 1))


def test_an_occurrence_becomes_one_campaign_with_a_message_per_target(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    definition_id = define(store, priority=2)

    early = run(store, client, MONDAY_9 - seconds(60))
    assert early.occurred == 0 and campaigns(store) == [], "not yet: 60 s before is too early"
    assert definition(store, definition_id)["nextOccurrenceAt"] == MONDAY_9
    assert early.next_at == MONDAY_9 - seconds(30), "the tick that materialises it is planned"

    counts = run(store, client, MONDAY_9 - seconds(20))
    assert counts.occurred == 1 and counts.sent == 0
    (campaign,) = campaigns(store)
    assert campaign["name"] == "Weekly menu 2026-11-30 09:00"
    assert campaign["definitionId"] == definition_id and campaign["occurrenceAt"] == MONDAY_9
    assert campaign["status"] == "scheduled" and campaign["stats"]["total"] == 3
    messages = list(store.messages.collection.find().sort("chatId", 1))
    assert [m["chatId"] for m in messages] == [
        "120363000000000001@g.us",
        "447700900001@c.us",  # written twice in targets, sent once
        "447700900002@c.us",
    ]
    for m in messages:
        assert m["scheduledAt"] == MONDAY_9 and m["campaignId"] == campaign["_id"]
        assert m["content"] == "This week's menu" and m["session"] == "default"
        assert m["priority"] == 2 and m["definitionId"] == definition_id
    doc = definition(store, definition_id)
    assert doc["lastOccurrenceAt"] == MONDAY_9
    assert doc["nextOccurrenceAt"] == MONDAY_9 + timedelta(days=7)

    sent = run(store, client, MONDAY_9)
    assert sent.sent == 3 and sent.occurred == 0
    assert sorted(m.chat_id for m in waha.sent) == [m["chatId"] for m in messages]
    (campaign,) = campaigns(store)
    assert campaign["status"] == "completed" and campaign["stats"]["sent"] == 3


def test_materialising_again_writes_nothing_new(store: Store) -> None:
    define(store)
    for _ in range(2):  # a second poller, or the same one again: the same documents
        schedules.materialise(store, MONDAY_9 - seconds(10), seconds(30), LONDON)
        store.definitions.collection.update_many({}, {"$unset": {"lastOccurrenceAt": ""}})
    assert len(campaigns(store)) == 1
    assert store.messages.collection.count_documents({}) == 3


def test_a_crash_between_the_messages_and_the_campaign_is_finished_once(
    store: Store, client: WahaClient, waha: WahaSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition_id = define(store)
    insert = store.campaigns.insert

    def crash(campaign: dict[str, Any]) -> bool:
        raise RuntimeError("the poller died here")

    monkeypatch.setattr(store.campaigns, "insert", crash)
    with pytest.raises(RuntimeError):
        run(store, client, MONDAY_9 - seconds(20))
    assert store.messages.collection.count_documents({}) == 3 and campaigns(store) == []
    assert "lastOccurrenceAt" not in definition(store, definition_id)

    monkeypatch.setattr(store.campaigns, "insert", insert)
    counts = run(store, client, MONDAY_9)
    assert counts.occurred == 1 and counts.sent == 3
    (campaign,) = campaigns(store)
    assert store.messages.collection.count_documents({"campaignId": campaign["_id"]}) == 3
    assert len(waha.sent) == 3
    assert definition(store, definition_id)["lastOccurrenceAt"] == MONDAY_9


def test_occurrences_missed_while_no_poller_ran_are_recorded_not_sent(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    definition_id = define(store, cron="0 * * * *", createdAt=MONDAY_9 - seconds(1))
    run(store, client, MONDAY_9 - seconds(10))
    run(store, client, MONDAY_9)
    assert len(waha.sent) == 3

    back = MONDAY_9 + timedelta(hours=4, minutes=1)  # away from 10:00 to 13:00; 13:00 in time
    counts = run(store, client, back)

    assert counts.missed == 3 and counts.occurred == 1 and counts.sent == 3
    found = campaigns(store)
    assert [c["status"] for c in found] == ["completed", "missed", "missed", "missed", "completed"]
    for missed in found[1:4]:
        assert store.messages.collection.count_documents({"campaignId": missed["_id"]}) == 0
        assert missed["lastError"].startswith("Not sent: no poller was running at 2026-11-30 ")
        assert "completedAt" in missed
    assert found[1]["name"] == "Weekly menu 2026-11-30 10:00"
    assert definition(store, definition_id)["nextOccurrenceAt"] == MONDAY_9 + timedelta(hours=5)
    assert len(waha.sent) == 6


def test_a_long_outage_keeps_the_latest_missed_occurrences_and_counts_the_rest(
    store: Store,
) -> None:
    define(store, cron="* * * * *", createdAt=MONDAY_9)
    found = schedules.materialise(store, MONDAY_9 + timedelta(days=1), seconds(30), LONDON)
    # 09:01 to 08:57 missed; 08:58 to 09:00, within the 2 minutes of lookback, still go out.
    assert found.missed == 24 * 60 - 3 and found.created == 3
    missed = [c for c in campaigns(store) if c["status"] == "missed"]
    assert len(missed) == schedules.MISSED_KEPT
    assert f"{24 * 60 - 3 - schedules.MISSED_KEPT} earlier occurrences" in missed[0]["lastError"]


def test_edits_change_occurrences_not_yet_materialised(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    definition_id = define(store)
    run(store, client, MONDAY_9 - seconds(20))
    edit = {"content": "New menu", "targets": ["447700900009"]}
    store.definitions.collection.update_one({"_id": definition_id}, {"$set": edit})
    run(store, client, MONDAY_9)
    assert {m.text for m in waha.sent} == {"This week's menu"} and len(waha.sent) == 3

    # The rule changes on Wednesday to daily at 08:00: Tuesday's and Wednesday's 08:00 under the
    # new rule were never due, and are not missed.
    wednesday = MONDAY_9 + timedelta(days=2, hours=1)
    store.definitions.collection.update_one({"_id": definition_id}, {"$set": {"cron": "0 8 * * *"}})
    counts = run(store, client, wednesday)
    assert counts.missed == 0 and counts.occurred == 0
    thursday_8 = MONDAY_9 + timedelta(days=3, hours=-1)
    assert definition(store, definition_id)["nextOccurrenceAt"] == thursday_8
    run(store, client, thursday_8 - seconds(5))
    run(store, client, thursday_8)
    assert [m.text for m in waha.sent[3:]] == ["New menu"]
    assert waha.sent[3].chat_id == "447700900009@c.us"


def test_switched_off_or_deleted_definitions_stop(store: Store, client: WahaClient) -> None:
    off = define(store)
    gone = define(store, name="Gone")
    run(store, client, MONDAY_9 - timedelta(hours=1))
    assert definition(store, off)["nextOccurrenceAt"] == MONDAY_9
    store.definitions.collection.update_one({"_id": off}, {"$set": {"isActive": False}})
    store.definitions.collection.delete_one({"_id": gone})

    counts = run(store, client, MONDAY_9 - seconds(10))
    assert counts.occurred == 0 and campaigns(store) == []
    assert "nextOccurrenceAt" not in definition(store, off)

    # Switched on again a week later: it goes on from then, nothing counted as missed.
    store.definitions.collection.update_one({"_id": off}, {"$set": {"isActive": True}})
    later = MONDAY_9 + timedelta(days=7, seconds=-10)
    counts = run(store, client, later)
    assert (counts.missed, counts.occurred) == (0, 1)
    assert [c["occurrenceAt"] for c in campaigns(store)] == [MONDAY_9 + timedelta(days=7)]


def test_a_definition_written_switched_off_starts_when_switched_on(
    store: Store, client: WahaClient
) -> None:
    definition_id = define(store, isActive=False, createdAt=MONDAY_9 - timedelta(days=30))
    run(store, client, MONDAY_9 - timedelta(days=1))
    store.definitions.collection.update_one({"_id": definition_id}, {"$set": {"isActive": True}})
    counts = run(store, client, MONDAY_9 - seconds(10))
    assert (counts.missed, counts.occurred) == (0, 1), "its Mondays while off are not missed"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"cron": "every monday"}, "cron 'every monday' has 2 fields; it needs 5"),
        ({"timezone": "Europe/Londn"}, "timezone 'Europe/Londn' is not an IANA time zone"),
        ({"targets": []}, "targets must be a list of chat ids or phone numbers, and not empty"),
        ({"targets": ["447700900001", "hello"]}, "targets[1] 'hello' is not a WhatsApp id"),
        ({"session": None}, "The definition names no WhatsApp session"),
        ({"sessionId": "64b000000000000000000001", "session": None}, "matches no WhatsApp session"),
        ({"content": " "}, "The definition has no text to send"),
        ({"startAt": "monday"}, "startAt 'monday' is not a date"),
    ],
)
def test_a_bad_definition_says_why_and_stops_nothing_else(
    store: Store, client: WahaClient, waha: WahaSimulator, fields: dict[str, Any], reason: str
) -> None:
    bad = define(store, **fields)
    good = define(store, name="Good", targets=["447700900005"])
    run(store, client, MONDAY_9 - seconds(20))
    counts = run(store, client, MONDAY_9)

    assert reason in definition(store, bad)["lastError"]
    assert [c["definitionId"] for c in campaigns(store)] == [good]
    assert counts.sent == 1 and [m.chat_id for m in waha.sent] == ["447700900005@c.us"]
    assert store.messages.collection.count_documents({"definitionId": bad}) == 0

    # Fixed within the lookback window, the occurrence still goes out.
    store.definitions.collection.replace_one(
        {"_id": bad}, {**definition(store, bad), **define_fields()}
    )
    counts = run(store, client, MONDAY_9 + seconds(30))
    assert counts.occurred == 1 and counts.sent == 3
    assert "lastError" not in definition(store, bad)


def test_an_occurrence_a_bad_definition_held_back_is_recorded_as_missed_with_its_reason(
    store: Store, client: WahaClient
) -> None:
    definition_id = define(store, targets=[])
    run(store, client, MONDAY_9 - seconds(20))
    counts = run(store, client, MONDAY_9 + timedelta(minutes=5))
    assert counts.missed == 1
    (missed,) = campaigns(store)
    assert missed["status"] == "missed" and missed["lastError"].startswith(
        "Not sent: the definition could not be used at 2026-11-30 09:00 Europe/London: targets"
    )
    assert "targets must be" in definition(store, definition_id)["lastError"]


def define_fields() -> dict[str, Any]:
    return {
        "cron": "0 9 * * 1",
        "timezone": "Europe/London",
        "content": "This week's menu",
        "targets": TARGETS,
        "session": "default",
        "startAt": MONDAY_9 - timedelta(days=1),
    }


def test_start_and_end_bound_the_occurrences(store: Store) -> None:
    week = timedelta(days=7)
    definition_id = define(store, startAt=MONDAY_9 + week, endAt=MONDAY_9 + 2 * week)
    schedules.materialise(store, MONDAY_9 - seconds(10), seconds(30), LONDON)
    assert definition(store, definition_id)["nextOccurrenceAt"] == MONDAY_9 + week
    for at in (MONDAY_9 + week, MONDAY_9 + 2 * week):
        schedules.materialise(store, at - seconds(10), seconds(30), LONDON)
    assert definition(store, definition_id)["nextOccurrenceAt"] is None
    assert [c["occurrenceAt"] for c in campaigns(store)] == [MONDAY_9 + week, MONDAY_9 + 2 * week]


def test_new_york_fall_back_day_has_one_occurrence_at_0130(store: Store) -> None:
    define(store, cron="30 1 * * *", timezone="America/New_York", createdAt=MONDAY_9)
    start = datetime(2026, 10, 31, 12, tzinfo=UTC)
    for step in range(0, 2 * 24 * 2):  # a tick every 30 minutes for two days
        schedules.materialise(store, start + step * timedelta(minutes=30), seconds(30), LONDON)
    found = [c["occurrenceAt"] for c in campaigns(store)]
    # 01:30 EDT on 1 November (05:30 UTC), not again at 01:30 EST; then 01:30 EST on 2 November.
    assert found == [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
    ]


def test_status_lists_active_definitions_with_their_next_occurrence(
    store: Store,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    define(store)
    define(store, name="Broken", cron="nope")
    define(store, name="Off", isActive=False)
    schedules.materialise(store, MONDAY_9 - timedelta(hours=1), seconds(30), LONDON)

    assert status.status(settings, as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)["schedules"]
    assert [(d["name"], d["nextOccurrenceAt"]) for d in listed] == [
        ("Weekly menu", "2026-11-30T09:00:00Z"),
        ("Broken", None),
    ]
    assert "has 1 field" in listed[1]["lastError"]

    monkeypatch.setenv("COLUMNS", "200")  # one row a line
    assert status.status(settings) == 0
    text = capsys.readouterr().out
    assert "Recurring schedules" in text and "2026-11-30 09:00" in text and "Broken" in text


# -- replicas on the wall clock ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)  # a minute per occurrence, on the wall clock
def test_two_replicas_materialise_each_occurrence_once_on_the_wall_clock(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    """A definition that fires every minute, two `poller run` replicas: one campaign per
    occurrence, and WAHA receives each occurrence's message once per target.
    RECURRING_OCCURRENCES sets how many occurrences it waits for (2; a minute each)."""
    wanted = int(os.environ.get("RECURRING_OCCURRENCES", "2"))
    now = utcnow()
    define(store, name="Every minute", cron="* * * * *", timezone="UTC", createdAt=now)
    env = environment(settings, POLL_INTERVAL_SECONDS="5")

    def completed() -> int:
        return store.campaigns.collection.count_documents({"status": "completed"})

    with replicas([env] * 2, tmp_path) as codes:
        wait_until(lambda: completed() >= wanted, 90 + 60 * wanted, "occurrences sent")

    assert codes == [0, 0]
    found = campaigns(store)
    occurrences = [c["occurrenceAt"] for c in found]
    assert len(occurrences) == len(set(occurrences)), "one campaign per occurrence"
    assert all(c["status"] in ("completed", "scheduled") for c in found), found
    assert all(at.second == 0 and at > now for at in occurrences)
    sent = list(store.messages.collection.find({"status": "sent"}))
    by_id = {m.id: m for m in waha.sent}
    assert len(by_id) == len(waha.sent) == len(sent), "WAHA got each message once"
    for campaign in found:
        chats = [
            by_id[m["wahaMessageId"]].chat_id for m in sent if m["campaignId"] == campaign["_id"]
        ]
        if campaign["status"] == "completed":
            assert sorted(chats) == [
                "120363000000000001@g.us",
                "447700900001@c.us",
                "447700900002@c.us",
            ]
    senders = {m["pickedBy"].split("/")[0] for m in sent}
    print(f"{len(found)} campaigns, {len(waha.sent)} messages received by WAHA, senders {senders}")
    for campaign in found:
        received = sorted(
            (by_id[m["wahaMessageId"]].at, by_id[m["wahaMessageId"]].chat_id)
            for m in sent
            if m["campaignId"] == campaign["_id"]
        )
        print(
            f"  {campaign['name']}: {campaign['status']}, "
            + ", ".join(
                f"{chat} at {datetime.fromtimestamp(at, UTC):%H:%M:%S}" for at, chat in received
            )
        )
