"""Every WAHA answer sorted into sent, retry later, failed for good or a refused key."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from httpcore._sync import http11
from support import API_KEY

from poller.testing.waha import WahaSimulator
from poller.waha import Outcome, Verdict, WahaClient, classify

NOT_FOUND = {
    "statusCode": 404,
    "message": "We didn't find a session with name 'default'.\nPlease start it first",
    "error": "Not Found",
}
NOT_WORKING = {
    "error": "Session status is not as expected. Try again later or restart the session",
    "session": "default",
    "status": "STARTING",
    "expected": ["WORKING"],
}
ENGINE = {
    "statusCode": 500,
    "timestamp": "2026-01-01T00:00:00.000Z",
    "exception": {"message": "2 UNKNOWN: server returned error 463", "name": "Error"},
}
CORE_ONLY = {
    "statusCode": 422,
    "message": "WAHA Core support only 'default' session.",
    "error": "Unprocessable Entity",
}


@pytest.mark.parametrize(
    ("code", "body", "verdict", "reason"),
    [
        (201, {"id": "true_1@c.us_AAA"}, Verdict.SENT, ""),
        (401, {"message": "Unauthorized", "statusCode": 401}, Verdict.REJECTED_KEY, "API key"),
        (403, None, Verdict.REJECTED_KEY, "API key"),
        (404, NOT_FOUND, Verdict.RETRY, "session 'default' is not started"),
        (422, NOT_WORKING, Verdict.RETRY, "session 'default' is STARTING, not WORKING"),
        (422, CORE_ONLY, Verdict.FAILED, "(422: WAHA Core support only 'default' session.)"),
        (429, None, Verdict.RETRY, "try later (429)"),
        (400, {"statusCode": 400, "message": "Unexpected token"}, Verdict.FAILED, "400"),
        (500, ENGINE, Verdict.FAILED, "500: 2 UNKNOWN: server returned error 463"),
        (502, "<html>", Verdict.FAILED, "not retried"),
    ],
)
def test_classify(code: int, body: Any, verdict: Verdict, reason: str) -> None:
    outcome = classify(code, body, "default")
    assert outcome.verdict is verdict
    assert reason in outcome.reason


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"id": "true_1@c.us_AAA"}, "true_1@c.us_AAA"),
        ({"key": {"id": "3EB0"}, "message": {}}, "3EB0"),  # raw Baileys object (NOWEB 2024.10)
        ({"_data": {"key": {"id": "3EB1"}}}, "3EB1"),
        (None, None),
    ],
)
def test_message_id(body: Any, expected: str | None) -> None:
    assert classify(201, body, "default").message_id == expected


def test_client_rejects_a_bad_url() -> None:
    with pytest.raises(ValueError, match="http"):
        WahaClient("localhost:3000", "", 30)


@pytest.mark.parametrize(
    "key", ["key\u200b-1", "\u201ckey-1\u201d", "key\u00a0-1", "key\t-1", "cl\u00e9-1"]
)
def test_client_rejects_a_key_no_header_can_carry(key: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII") as raised:
        WahaClient("http://localhost:3000", key, 30)
    assert key not in str(raised.value)


# -- against the simulator ------------------------------------------------------------------------


@pytest.fixture
def client(waha: WahaSimulator) -> Iterator[WahaClient]:
    client = WahaClient(waha.url, API_KEY, 10.0)
    yield client
    client.close()


def wait_until(done: Callable[[], bool], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("code", "content_type", "text"),
    [
        (200, "text/html", "<!DOCTYPE html><html><body>WAHA Dashboard</body></html>"),
        (200, "application/json", "{}"),
        (200, "application/json", '{"id": ""}'),
        (200, "application/json", '{"id": 12345}'),
        (200, "application/json", "not json"),
        (201, "application/json", '{"result": true}'),
    ],
)
def test_a_new_message_id_answer_without_an_id_is_retried_never_sent(
    waha: WahaSimulator, client: WahaClient, code: int, content_type: str, text: str
) -> None:
    waha.raw_answers["/api/default/new-message-id"] = (code, content_type, text)
    got = client.new_message_id("default")
    assert got == Outcome(
        Verdict.RETRY,
        f"WAHA answered new-message-id without a message id ({code}, {content_type})",
        status_code=code,
    )
    assert client.offers_ids


@pytest.mark.parametrize(("session", "segment"), [(".", "%2E"), ("..", "%2E%2E"), ("a/b", "a%2Fb")])
def test_a_session_name_is_one_path_segment(
    waha: WahaSimulator, client: WahaClient, session: str, segment: str
) -> None:
    waha.sessions = {session: "WORKING"}
    assert isinstance(client.new_message_id(session), str)
    assert [r.path for r in waha.requests] == [f"/api/{segment}/new-message-id"]


def test_core_waha_without_the_route_turns_ids_off(waha: WahaSimulator, client: WahaClient) -> None:
    waha.core = True
    waha.sessions = {"default": "WORKING"}
    assert client.new_message_id("default") is None
    assert not client.offers_ids
    assert client.new_message_id("default") is None
    assert len(waha.requests) == 1, "not asked again"


@pytest.mark.parametrize("session", ["..", "."])
def test_an_unknown_session_keeps_ids_on(
    waha: WahaSimulator, client: WahaClient, session: str
) -> None:
    got = client.new_message_id(session)
    assert isinstance(got, Outcome) and got.verdict is Verdict.RETRY
    assert got.reason == f"WhatsApp session '{session}' is not started on WAHA"
    assert client.offers_ids
    assert isinstance(client.new_message_id("default"), str)


@pytest.mark.parametrize(
    ("code", "content_type", "text", "reason"),
    [
        (404, "text/html", "<h1>Not Found</h1>", "(404, text/html)"),
        (404, "application/json", '{"statusCode":404,"message":"Not Found"}', "(404: Not Found)"),
        (405, "text/plain", "Method Not Allowed", "(405, text/plain)"),
        (
            404,
            "application/json",
            '{"statusCode":404,"message":"Cannot GET /api/other/new-message-id"}',
            "(404: Cannot GET /api/other/new-message-id)",
        ),
    ],
)
def test_an_unclear_404_is_retried_and_keeps_ids_on(
    waha: WahaSimulator, client: WahaClient, code: int, content_type: str, text: str, reason: str
) -> None:
    waha.raw_answers["/api/default/new-message-id"] = (code, content_type, text)
    got = client.new_message_id("default")
    assert got == Outcome(Verdict.RETRY, f"WAHA gave no message id {reason}", status_code=code)
    assert client.offers_ids


def test_a_chat_action_waits_for_wahas_answer_on_a_session_not_working(
    waha: WahaSimulator, client: WahaClient
) -> None:
    waha.sessions = {"default": "STARTING"}
    waha.not_working_wait = 5.0  # as WAHA: it polls the session for 5 s, then answers 422
    outcome = client.chat_action("/api/sendSeen", "default", "447700900123@c.us")
    assert outcome == Outcome(
        Verdict.RETRY, "WhatsApp session 'default' is STARTING, not WORKING", status_code=422
    )


def test_the_client_reconnects_after_waha_closes_an_idle_connection(
    waha: WahaSimulator, client: WahaClient
) -> None:
    waha.keepalive_seconds = 0.2
    assert client.send_text("default", "447700900123@c.us", "one").verdict is Verdict.SENT
    wait_until(lambda: waha.connections_closed_idle == 1)
    assert client.send_text("default", "447700900123@c.us", "two").verdict is Verdict.SENT
    assert waha.connections_opened == 2


def test_the_client_drops_an_idle_connection_before_waha_would(
    waha: WahaSimulator, client: WahaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake clock for httpcore's keep-alive check: the connection has idled 4.9 s, and WAHA
    # closes at 5 s, so reusing it could meet WAHA's close on the wire.
    idle = [0.0]
    clock = SimpleNamespace(monotonic=lambda: time.monotonic() + idle[0])
    monkeypatch.setattr(http11, "time", clock)
    assert client.send_text("default", "447700900123@c.us", "one").verdict is Verdict.SENT
    idle[0] = 4.9
    assert client.send_text("default", "447700900123@c.us", "two").verdict is Verdict.SENT
    assert waha.connections_opened == 2
