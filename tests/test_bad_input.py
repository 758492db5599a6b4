"""Whatever the web app writes, the poller keeps going: bad documents end with a reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import message, seconds

from poller.contract import YES
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SESSION_ID = ObjectId("0123456789abcdef01234567")  # a whatsappsessions document named "default"

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text("abc", max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
moment = st.integers(0, 300_000).map(lambda ms: NOW - timedelta(milliseconds=ms))
fields: dict[str, st.SearchStrategy[Any]] = {
    "scheduledAt": moment | moment | st.text(max_size=30) | junk,
    "chatId": st.sampled_from(["447700900123", "447700900124@c.us", "120363012345678901@g.us"])
    | st.text(max_size=30)
    | junk,
    "content": st.text(max_size=50) | st.text(min_size=5000, max_size=20000) | junk,
    "session": st.just("default") | st.just("") | junk,
    "sessionId": st.just(SESSION_ID) | st.just(str(SESSION_ID)) | st.builds(ObjectId) | junk,
    "campaignId": st.builds(ObjectId) | junk,
    "isSent": st.booleans() | junk,
    "isDeleted": st.booleans() | junk,
    "isPicked": st.booleans() | junk,
    "extra": junk,
}
documents = st.lists(st.fixed_dictionaries({}, optional=fields), min_size=1, max_size=6)


def says(value: Any, yes: list[Any]) -> bool:
    """MongoDB's reading of a flag: the value, or an element of an array, equals one in `yes`
    (true equals only true; 1 equals 1.0)."""

    def equal(a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return isinstance(a, bool) and isinstance(b, bool) and a == b
        return bool(a == b)

    values = value if isinstance(value, list) else [value]
    return any(equal(v, y) for v in values for y in yes)


@pytest.mark.timeout(600)  # 40 examples of up to 30 documents each, on SecantusDB
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(docs=documents)
def test_arbitrary_documents_never_stop_the_poller(
    store: Store, settings: Settings, waha: WahaSimulator, docs: list[dict[str, Any]]
) -> None:
    store.messages.collection.delete_many({})
    store.campaigns.collection.delete_many({})
    store.sessions.collection.replace_one({"_id": SESSION_ID}, {"name": "default"}, upsert=True)
    waha.sent.clear()
    good = store.messages.collection.insert_one(message(NOW, chat_id="447700900999")).inserted_id
    ids = store.messages.collection.insert_many(docs).inserted_ids
    client = WahaClient(settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds)
    try:
        tick(store, client, settings.batch_size, now=NOW)
        # Later: whatever was left pending must now be settled too.
        tick(store, client, settings.batch_size, now=NOW + seconds(settings.lookback_seconds + 1))
    finally:
        client.close()

    assert store.messages.collection.find_one({"_id": good})["status"] == "sent"  # type: ignore[index]
    sent_docs = 0
    for message_id, written in zip(ids, docs, strict=True):
        doc = store.messages.collection.find_one({"_id": message_id})
        assert doc is not None
        if says(written.get("isSent"), YES) or says(written.get("isDeleted"), YES):
            assert "status" not in doc, "a sent or deleted message is left alone"
        elif says(written.get("isPicked"), [True]):
            assert "status" not in doc, "a message picked elsewhere is left alone"
        elif doc["status"] == "sent":
            sent_docs += 1
            assert isinstance(written.get("content"), str) and written["content"].strip()
        else:
            assert doc["status"] in ("failed", "expired"), doc
            assert isinstance(doc["lastError"], str) and len(doc["lastError"]) > 20
    assert len(waha.sent) == sent_docs + 1, "each sent document reached WAHA exactly once"
