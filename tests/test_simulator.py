"""What the WAHA simulator answers, held against WAHA's published spec and CONTRACT.md section 5.

The published spec (2026.7.1) describes success answers only: for an error it says nothing. There
the tests check that the spec is still silent (a spec that starts describing it fails them, to be
validated then) and compare the body with what WAHA was observed to answer.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
from openapi_core import Config, OpenAPI
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.response.exceptions import InvalidData
from support import API_KEY, NO_SPEC, SPEC

from poller.testing.waha import CHAT_ACTIONS, CORE_ONLY, SENDS, WahaSimulator, engine_error
from poller.waha import Verdict, WahaClient

CHAT = "447700900123@c.us"
NOT_WORKING = "Session status is not as expected. Try again later or restart the session"


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    if not SPEC.exists():
        pytest.skip(NO_SPEC)
    # The spec has schema slips of its own (`required: true`): check answers, not the spec.
    return OpenAPI.from_dict(json.loads(SPEC.read_text()), config=Config(spec_validator_cls=None))


class Exchange:
    """One request to the simulator and its answer, in the shapes openapi-core reads."""

    def __init__(
        self, waha: WahaSimulator, method: str, path: str, body: Any = None, key: str = API_KEY
    ) -> None:
        args = {"all": "true"} if path == "/api/sessions" else None
        data = json.dumps(body).encode() if body is not None else None
        headers = {"X-Api-Key": key, "Content-Type": "application/json"}
        self.response = httpx.request(
            method, waha.url + path, params=args, content=data, headers=headers, timeout=30
        )
        # Every answer of WAHA's says how long it keeps the connection (CONTRACT section 5).
        assert self.response.headers["Keep-Alive"] == "timeout=5"
        self.code = self.response.status_code
        self.body = self.response.json()
        self.request = MockRequest(
            "http://localhost:3000", method, path, args=args, headers=headers, data=data
        )

    def spec_errors(self, spec: OpenAPI) -> list[str]:
        """Where the body breaks the schema the spec gives this answer ("$.0.me: ..."), sorted."""
        content_type = self.response.headers["Content-Type"].split(";")[0]
        answer = MockResponse(self.response.content, self.code, content_type=content_type)
        try:
            spec.validate_response(self.request, answer)
        except InvalidData as exc:
            errors = exc.__cause__.schema_errors
            return sorted(
                ".".join(["$", *map(str, e.absolute_path)]) + f": {e.message}" for e in errors
            )
        return []

    def undocumented(self, spec: OpenAPI) -> None:
        """The spec describes no such answer for this route: nothing in it to validate against."""
        with pytest.raises(ResponseNotFound):
            self.spec_errors(spec)


def send_body(route: str, session: str) -> dict[str, Any]:
    body: dict[str, Any] = {"session": session, "chatId": CHAT}
    if route == "/api/sendText":
        body["text"] = "Hello"
    elif route in ("/api/sendImage", "/api/sendFile"):
        body["file"] = {"mimetype": "image/png", "url": "https://example.com/a.png"}
    return body


def test_the_session_list_is_session_info(spec: OpenAPI, waha: WahaSimulator) -> None:
    waha.sessions = {"default": "WORKING", "sales": "SCAN_QR_CODE", "old": "STOPPED"}
    answer = Exchange(waha, "GET", "/api/sessions")
    assert answer.spec_errors(spec) == []
    assert [(s["name"], s["status"]) for s in answer.body] == list(waha.sessions.items())


def test_core_lists_default_as_observed(spec: OpenAPI, waha: WahaSimulator) -> None:
    waha.core, waha.sessions = True, {}
    answer = Exchange(waha, "GET", "/api/sessions")
    assert answer.body == [{"name": "default", "status": "STOPPED", "config": None, "me": None}]
    # WAHA 2024.10.8's answer, next to the 2026.7.1 spec: null `me`/`config`, and none of
    # the fields added since. Everything else in it matches.
    assert answer.spec_errors(spec) == [
        "$.0.config: None is not of type 'object'",
        "$.0.me: None is not of type 'object'",
        "$.0: 'presence' is a required property",
        "$.0: 'timestamps' is a required property",
    ]
    waha.sessions = {"default": "WORKING"}
    assert Exchange(waha, "GET", "/api/sessions").body[0]["status"] == "WORKING"


def test_a_text_sent_is_a_wa_message(spec: OpenAPI, waha: WahaSimulator) -> None:
    answer = Exchange(waha, "POST", "/api/sendText", send_body("/api/sendText", "default"))
    assert answer.code == 201
    # The spec marks every WAMessage field required; WAHA's engines leave `participant` (groups
    # only) and `mediaUrl` (media only) undefined for a text to a person, so JSON has neither.
    assert answer.spec_errors(spec) == [
        "$: 'mediaUrl' is a required property",
        "$: 'participant' is a required property",
    ]


@pytest.mark.parametrize("route", CHAT_ACTIONS)
def test_a_chat_action_is_answered_201(spec: OpenAPI, waha: WahaSimulator, route: str) -> None:
    answer = Exchange(waha, "POST", route, send_body(route, "default"))
    assert answer.code == 201
    assert answer.spec_errors(spec) == []


def test_a_wrong_key_is_401(spec: OpenAPI, waha: WahaSimulator) -> None:
    answer = Exchange(waha, "POST", "/api/sendText", send_body("/api/sendText", "default"), "bad")
    assert (answer.code, answer.body) == (401, {"message": "Unauthorized", "statusCode": 401})
    answer.undocumented(spec)


@pytest.mark.parametrize("route", SENDS + CHAT_ACTIONS)
@pytest.mark.parametrize("session", ["ghost", "old"])
def test_a_session_not_listed_or_stopped_gets_404_on_every_send_route(
    spec: OpenAPI, waha: WahaSimulator, route: str, session: str
) -> None:
    waha.sessions = {"default": "WORKING", "old": "STOPPED"}
    answer = Exchange(waha, "POST", route, send_body(route, session))
    assert answer.code == 404
    assert answer.body["message"].startswith(f"We didn't find a session with name '{session}'.")
    answer.undocumented(spec)


@pytest.mark.parametrize("route", ["/api/sendText", "/api/sendSeen"])
def test_a_session_not_working_gets_422_with_its_status(
    spec: OpenAPI, waha: WahaSimulator, route: str
) -> None:
    waha.sessions = {"default": "STARTING"}
    answer = Exchange(waha, "POST", route, send_body(route, "default"))
    assert answer.code == 422
    assert answer.body == {
        "error": NOT_WORKING,
        "session": "default",
        "status": "STARTING",
        "expected": ["WORKING"],
    }
    answer.undocumented(spec)


@pytest.mark.parametrize("route", SENDS + CHAT_ACTIONS)
def test_core_refuses_any_other_session_with_422(
    spec: OpenAPI, waha: WahaSimulator, route: str
) -> None:
    waha.core = True
    # Not listed: without the Core rule this would be a 404.
    answer = Exchange(waha, "POST", route, send_body(route, "sales"))
    assert answer.code == 422
    assert answer.body == {
        "statusCode": 422,
        "message": CORE_ONLY,
        "error": "Unprocessable Entity",
    }
    answer.undocumented(spec)


def test_an_engine_error_is_500(spec: OpenAPI, waha: WahaSimulator) -> None:
    waha.scripted[CHAT] = engine_error("2 UNKNOWN: server returned error 463")
    answer = Exchange(waha, "POST", "/api/sendText", send_body("/api/sendText", "default"))
    assert answer.code == 500
    assert answer.body["exception"]["message"] == "2 UNKNOWN: server returned error 463"
    answer.undocumented(spec)


@pytest.mark.parametrize(("session", "segment"), [("default", "default"), ("a/b", "a%2Fb")])
def test_a_new_message_id(spec: OpenAPI, waha: WahaSimulator, session: str, segment: str) -> None:
    waha.sessions = {session: "WORKING"}
    answer = Exchange(waha, "GET", f"/api/{segment}/new-message-id")
    assert answer.code == 200
    assert answer.spec_errors(spec) == []


@pytest.mark.parametrize("segment", ["default", "%2E%2E"])
def test_core_has_no_new_message_id_route(spec: OpenAPI, waha: WahaSimulator, segment: str) -> None:
    waha.core = True
    answer = Exchange(waha, "GET", f"/api/{segment}/new-message-id")
    assert answer.body == {
        "statusCode": 404,
        "message": f"Cannot GET /api/{segment}/new-message-id",
        "error": "Not Found",
    }
    answer.undocumented(spec)


def test_a_raw_answer_replaces_the_route(waha: WahaSimulator) -> None:
    waha.raw_answers["/api/default/new-message-id"] = (200, "text/html", "<html></html>")
    response = httpx.get(f"{waha.url}/api/default/new-message-id", headers={"X-Api-Key": API_KEY})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html"
    assert response.text == "<html></html>"


def test_a_listing_delay_holds_the_answer_back(waha: WahaSimulator) -> None:
    waha.listing_delay = 30.0  # far past the client's timeout
    client = WahaClient(waha.url, API_KEY, 0.5)
    try:
        outcome = client.sessions()
    finally:
        client.close()
    assert not isinstance(outcome, list)
    assert outcome.verdict is Verdict.RETRY and "ReadTimeout" in outcome.reason


def test_an_idle_connection_is_closed(waha: WahaSimulator) -> None:
    waha.keepalive_seconds = 0.2
    host, port = waha.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"GET /ping HTTP/1.1\r\nHost: waha\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"message": "pong"}'):
            answer += connection.recv(4096)
        assert b"Keep-Alive: timeout=0.2" in answer
        assert connection.recv(4096) == b"", "closed by the simulator, before our 30 s timeout"
