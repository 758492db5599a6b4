"""Each definition is isolated: one that raises, or whose write MongoDB refuses, records why on
itself, once, and is skipped; the others are materialised and sent, and the tick goes on. Only
MongoDB being unreachable fails the tick.

The ticks run on a fake clock (`now=`), as in tests/test_recurring.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from loguru import logger
from pymongo.errors import ServerSelectionTimeoutError
from support import seconds

from poller.pacing import Pacing
from poller.store import Store
from poller.testing.waha import WahaSimulator
from poller.tick import TickCounts, tick
from poller.waha import WahaClient

LONDON = ZoneInfo("Europe/London")
# Monday 30 November 2026, 09:00 in London (GMT).
MONDAY_9 = datetime(2026, 11, 30, 9, tzinfo=UTC)
BAD_TARGETS = ["447700900001", "447700900002"]
BAD_CHATS = ["447700900001@c.us", "447700900002@c.us"]
GROUP = "120363000000000001@g.us"
GOOD_CHAT = "447700900005@c.us"
# The web app's own schema, as collection validators: a message's text and a campaign's name
# fit in 100 characters; messages go to contacts only, not to groups.
SHORT = {"bsonType": "string", "maxLength": 100}
SHORT_TEXT = {"$jsonSchema": {"properties": {"content": SHORT}}}
SHORT_NAME = {"$jsonSchema": {"properties": {"name": SHORT}}}
CONTACTS_ONLY = {"chatId": {"$regex": "@c[.]us$"}}


def define(store: Store, **fields: Any) -> Any:
    """A definition as the web app writes it: Mondays 09:00 London."""
    doc: dict[str, Any] = {
        "name": "Weekly menu",
        "cron": "0 9 * * 1",
        "timezone": "Europe/London",
        "content": "This week's menu",
        "targets": BAD_TARGETS,
        "session": "default",
        "createdAt": MONDAY_9 - timedelta(days=3),
    }
    doc.update(fields)
    return store.definitions.collection.insert_one(doc).inserted_id


def good(store: Store) -> Any:
    return define(store, name="Good", targets=[GOOD_CHAT])


def run(store: Store, client: WahaClient, now: datetime) -> TickCounts:
    return tick(store, client, 20, now=now, pacing=Pacing(zone=LONDON))


def definition(store: Store, definition_id: Any) -> dict[str, Any]:
    found = store.definitions.collection.find_one({"_id": definition_id})
    assert found is not None
    return found


def campaign_owners(store: Store) -> list[Any]:
    return [c["definitionId"] for c in store.campaigns.collection.find().sort("occurrenceAt", 1)]


@contextmanager
def warnings_about(definition_id: Any) -> Iterator[list[str]]:
    """The warnings (and worse) logged inside the block that name the definition's id."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    found: list[str] = []
    try:
        yield found
    finally:
        logger.remove(sink)
        found += [line for line in lines if str(definition_id) in line]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        # A region, not a zone: ZoneInfo raises IsADirectoryError (an OSError).
        ({"timezone": "Europe"}, "'Europe'"),
        ({"timezone": "US"}, "'US'"),
        # The first date a datetime holds: the day before it overflows (OverflowError).
        ({"startAt": datetime(1, 1, 1, tzinfo=UTC)}, "OverflowError"),
    ],
    ids=["region-Europe", "region-US", "year-1"],
)
def test_a_definition_that_raises_records_why_and_stops_nothing_else(
    store: Store, client: WahaClient, waha: WahaSimulator, fields: dict[str, Any], says: str
) -> None:
    bad = define(store, **fields)
    good_id = good(store)
    with warnings_about(bad) as logged:
        ahead = run(store, client, MONDAY_9 - seconds(20))
        counts = run(store, client, MONDAY_9)
        later = run(store, client, MONDAY_9 + seconds(30))

    assert (ahead.occurred, counts.sent, later.sent) == (1, 1, 0)
    assert campaign_owners(store) == [good_id]
    assert [m.chat_id for m in waha.sent] == [GOOD_CHAT]
    assert store.messages.collection.count_documents({"definitionId": bad}) == 0
    doc = definition(store, bad)
    assert says in doc["lastError"] and "nextOccurrenceAt" not in doc
    assert len(logged) == 1 and doc["lastError"] in logged[0], "logged once, not every tick"


@pytest.mark.parametrize(
    ("collection", "validator", "fields", "also_sent"),
    [
        ("messages", SHORT_TEXT, {"content": "menu " * 30}, []),
        # The messages MongoDB takes are written before the campaign: they go out all the same,
        # once; the next tries find them written already, and log nothing new.
        ("messages", CONTACTS_ONLY, {"targets": ["447700900001", GROUP]}, ["447700900001@c.us"]),
        ("campaigns", SHORT_NAME, {"name": "Weekly menu " * 10}, BAD_CHATS),
    ],
    ids=["messages", "some-messages", "campaign"],
)
def test_a_write_mongodb_refuses_is_recorded_and_tried_again(
    store: Store,
    client: WahaClient,
    waha: WahaSimulator,
    collection: str,
    validator: dict[str, Any],
    fields: dict[str, Any],
    also_sent: list[str],
) -> None:
    refusing = getattr(store, collection).collection
    refusing.database.command("collMod", refusing.name, validator=validator)
    bad = define(store, **fields)
    good_id = good(store)
    with warnings_about(bad) as logged:
        ahead = run(store, client, MONDAY_9 - seconds(20))
        counts = run(store, client, MONDAY_9)

    assert ahead.occurred == 1 and counts.sent == 1 + len(also_sent)
    assert campaign_owners(store) == [good_id]
    assert sorted(m.chat_id for m in waha.sent) == sorted([GOOD_CHAT, *also_sent])
    doc = definition(store, bad)
    assert (
        "MongoDB refused" in doc["lastError"] and "Document failed validation" in doc["lastError"]
    )
    assert "nextOccurrenceAt" not in doc and "lastOccurrenceAt" not in doc
    assert len(logged) == 1 and doc["lastError"] in logged[0], "logged once, not every tick"

    # The web app relaxes its schema within the lookback window: the occurrence still goes out.
    refusing.database.command("collMod", refusing.name, validator={})
    again = run(store, client, MONDAY_9 + seconds(30))
    assert again.occurred == 1 and campaign_owners(store) == [good_id, bad]
    doc = definition(store, bad)
    assert "lastError" not in doc and doc["lastOccurrenceAt"] == MONDAY_9
    assert doc["nextOccurrenceAt"] == MONDAY_9 + timedelta(days=7)


def test_mongodb_unreachable_fails_the_tick_and_blames_no_definition(
    store: Store, client: WahaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition_id = good(store)

    def unreachable(definition_id: Any) -> dict[str, Any]:
        raise ServerSelectionTimeoutError("No servers found yet")

    monkeypatch.setattr(store.definitions, "get", unreachable)
    with pytest.raises(ServerSelectionTimeoutError):
        run(store, client, MONDAY_9 - seconds(20))
    assert "lastError" not in definition(store, definition_id)
