"""The HTTP API on the dashboard's server (poller/dashboard/api.py): messages and campaigns
scheduled, looked up and cancelled, every answer checked against the API's own OpenAPI
description (`GET /api/openapi.json`).

One test runs a real `poller run` and sends through the WAHA simulator; the others serve the
dashboard from this process over the test's database, and plan with a tick on a fixed clock.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import (
    DASHBOARD_TOKEN,
    environment,
    message,
    replicas,
    seconds,
    utcnow,
    wait_until,
)
from werkzeug.test import Client as WsgiClient

from poller import web
from poller.dashboard import Dashboard
from poller.dashboard.openapi import SPEC
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import free_port
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient

BEARER = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
CHAT = "447700900123@c.us"


@pytest.fixture(scope="module")
def openapi() -> Any:
    """The API's own description, valid OpenAPI 3.1, ready to check answers against."""
    from openapi_core import OpenAPI
    from openapi_spec_validator import validate

    validate(SPEC)
    return OpenAPI.from_dict(SPEC)


class Checked:
    """An HTTP client of the dashboard whose every answer is checked against the description
    (and every request it makes, unless it is meant to be wrong)."""

    def __init__(self, base: str, openapi: Any, headers: dict[str, str] | None = None) -> None:
        self.http = httpx.Client(
            base_url=base, headers=BEARER if headers is None else headers, timeout=30
        )
        self.openapi = openapi

    def __call__(self, method: str, path: str, valid: bool = True, **kwargs: Any) -> Any:
        from openapi_core.testing import MockRequest, MockResponse

        answer = self.http.request(method, path, **kwargs)
        request = MockRequest(
            "http://localhost",
            method.lower(),
            path,
            headers=dict(answer.request.headers),
            data=answer.request.content or None,
        )
        if valid:
            self.openapi.validate_request(request)
        content_type = answer.headers.get("Content-Type", "").split(";")[0]
        response = MockResponse(answer.content, answer.status_code, dict(answer.headers))
        response.content_type = content_type
        self.openapi.validate_response(request, response)
        return answer

    def close(self) -> None:
        self.http.close()


def serve(store: Store, pacing: Pacing, clock: Callable[[], datetime] | None = None) -> Any:
    port = free_port()
    dashboard = Dashboard(store, pacing, DASHBOARD_TOKEN, clock=clock)
    return Metrics().serve("127.0.0.1", port, lambda: True, None, dashboard), port


@pytest.fixture
def api(store: Store, openapi: Any) -> Iterator[Checked]:
    """The dashboard over the test's database (pacing off, the wall clock), as a script sees it."""
    server, port = serve(store, Pacing())
    checked = Checked(f"http://127.0.0.1:{port}", openapi)
    yield checked
    checked.close()
    server.shutdown()


def test_the_api_serves_its_description(api: Checked) -> None:
    answer = api("GET", "/api/openapi.json")
    assert answer.status_code == 200 and answer.json() == SPEC
    assert answer.json()["openapi"].startswith("3.1")
    with httpx.Client(base_url=str(api.http.base_url), timeout=30) as anonymous:
        assert anonymous.get("/api/openapi.json").status_code == 401
        for path in ("/api/messages", "/api/campaigns", f"/api/messages/{'0' * 24}/cancel"):
            assert anonymous.post(path, json={"to": CHAT}).status_code == 401, path
        assert anonymous.get(f"/api/messages/{'0' * 24}").status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert anonymous.get("/api/openapi.json", headers=wrong).status_code == 401


def test_a_message_posted_to_poller_run_is_delivered_once(
    settings: Settings, waha: WahaSimulator, openapi: Any, tmp_path: Path
) -> None:
    port = free_port()
    env = environment(
        settings,
        HEALTH_PORT=str(port),
        DASHBOARD_TOKEN=DASHBOARD_TOKEN,
        POLL_INTERVAL_SECONDS="2",
        HEARTBEAT_SECONDS="1",
    )
    api = Checked(f"http://127.0.0.1:{port}", openapi)
    body = {"to": "+44 7700 900123", "text": "Hello from the API"}
    retry = {**BEARER, "Idempotency-Key": "first-send-1"}
    try:
        with replicas([env], tmp_path):
            wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 120, "poller run")
            first = api("POST", "/api/messages", json=body, headers=retry)
            assert first.status_code == 201, first.text
            [sent_id] = first.json()["ids"]
            # The client did not see that answer and sends it again: the same one, no new write.
            again = api("POST", "/api/messages", json=body, headers=retry)
            assert (again.status_code, again.text) == (201, first.text)
            assert again.headers["Idempotent-Replayed"] == "true"

            def status() -> Any:
                return api("GET", f"/api/messages/{sent_id}").json()

            wait_until(lambda: status()["status"] == "sent", 120, "the message sent")
            shown = status()
            assert shown["final"] and shown["lastError"] is None and shown["sentAt"]
            assert shown["chatId"] == CHAT and shown["session"] == "default"
            late = api("POST", f"/api/messages/{sent_id}/cancel")
            assert late.status_code == 409 and late.json()["error"] == (
                "not cancelled: it has ended: sent"
            )
    finally:
        api.close()
    assert [(m.chat_id, m.text) for m in waha.sent] == [(CHAT, "Hello from the API")]


def test_many_messages_are_all_checked_before_any_is_written(api: Checked, store: Store) -> None:
    good = {"to": "447700900001", "text": "One", "in": "1h", "priority": 2}
    bad: list[dict[str, Any]] = [good, {"to": "12", "text": "", "at": "tomorrow", "colour": "red"}]
    refused = api("POST", "/api/messages", valid=False, json=bad)
    assert refused.status_code == 422
    assert refused.json()["problems"] == [
        "messages[1].colour: not a field of a message",
    ]
    bad[1].pop("colour")
    refused = api("POST", "/api/messages", valid=False, json={"messages": bad})
    assert refused.status_code == 422
    assert refused.json()["problems"] == [
        "messages[1].to: '12' is not a phone number or a WhatsApp chat id",
        "messages[1].text: empty; a message needs text (or an image)",
        "messages[1].at: 'tomorrow' is not a date and time such as 2026-12-24T09:00",
    ]
    assert refused.json()["error"].startswith("nothing was written: messages[1].to:")
    one = api("POST", "/api/messages", valid=False, json={"to": CHAT, "image": "/etc/passwd"})
    assert one.json()["problems"] == ["image: '/etc/passwd' is not an http(s) URL"]
    assert store.messages.collection.count_documents({}) == 0

    two = [good, {"to": CHAT, "image": "https://example.com/menu.png", "session": "sales"}]
    written = api("POST", "/api/messages", json={"messages": two})
    assert written.status_code == 201
    ids, views = written.json()["ids"], written.json()["messages"]
    assert [v["id"] for v in views] == ids and len(set(ids)) == 2
    assert [(v["status"], v["session"], v["final"]) for v in views] == [
        ("waiting", "default", False),
        ("waiting", "sales", False),
    ]
    docs = {str(d["_id"]): d for d in store.messages.collection.find()}
    assert docs[ids[0]]["priority"] == 2 and docs[ids[0]]["content"] == "One"
    assert docs[ids[1]]["media"] == {"url": "https://example.com/menu.png", "mimetype": "image/png"}


def test_a_body_of_the_wrong_shape_answers_400_naming_the_field(api: Checked, store: Store) -> None:
    def problems(path: str, **kwargs: Any) -> list[str]:
        answer = api("POST", path, valid=False, **kwargs)
        assert answer.status_code == 400, answer.text
        return answer.json()["problems"]  # type: ignore[no-any-return]

    assert problems("/api/messages", content=b'{"to": ') == [
        "body: not JSON (Expecting value at line 1 column 8)"
    ]
    assert problems("/api/messages", content=b"\x80{}") == [
        "body: not UTF-8 text (invalid start byte)"
    ]
    assert problems("/api/messages", json=42) == [
        'body: a message (a JSON object), a list of them, or {"messages": []}'
    ]
    assert problems("/api/messages", json={"messages": {"to": CHAT}}) == [
        "messages: must be a list of messages"
    ]
    assert problems("/api/messages", json=[{"to": CHAT, "text": "a"}, "b"]) == [
        "messages[1]: must be a JSON object (a message)"
    ]
    assert problems("/api/messages", json={"messages": [], "session": "x"}) == [
        "session: not a field beside messages"
    ]
    campaign = {"name": "N", "text": "Hi", "recipients": [{"phone": CHAT}]}
    assert problems("/api/campaigns", json=[campaign]) == ["body: a campaign must be a JSON object"]
    assert problems("/api/campaigns", json={**campaign, "dryRun": "yes"}) == [
        "dryRun: must be true or false"
    ]
    assert problems("/api/campaigns", json={**campaign, "recipients": CHAT}) == [
        "recipients: must be a list of objects, one per recipient"
    ]
    assert problems("/api/campaigns", json={**campaign, "recipients": [{"phone": [1]}]}) == [
        "recipients[0].phone: must be text or a whole number"
    ]
    assert problems("/api/campaigns", json={"name": "N", "text": "Hi", "csv": 7}) == [
        "csv: must be text"
    ]
    odd_key = {**BEARER, "Idempotency-Key": "has spaces"}
    assert problems("/api/messages", json={"to": CHAT, "text": "a"}, headers=odd_key) == [
        "Idempotency-Key: 1 to 200 printable characters without spaces"
    ]
    assert store.messages.collection.count_documents({}) == 0
    assert store.campaigns.collection.count_documents({}) == 0


def test_a_body_over_the_limit_answers_413(api: Checked, store: Store) -> None:
    port = api.http.base_url.port
    assert port is not None
    # Over the API's limit, or over the small one elsewhere: refused from the Content-Length,
    # before any of the body is sent.
    for path, limit in (("/api/campaigns", web.API_BODY_BYTES), ("/login", web.BODY_BYTES)):
        assert _status(port, f"POST {path}", f"Content-Length: {limit + 1}") == 413, path
    # A CSV of a few thousand rows fits.
    rows = "".join(f"4477{n:08d},Name {n}\n" for n in range(3000))
    body = {"name": "Big", "text": "Hi {name}", "csv": "phone,name\n" + rows, "dryRun": True}
    assert len(json.dumps(body)) > web.BODY_BYTES
    answer = api("POST", "/api/campaigns", json=body)
    assert answer.status_code == 200 and answer.json()["messages"] == 3000
    # The dashboard holds bodies to the same limits itself, in words.
    app = WsgiClient(Dashboard(store, Pacing(), DASHBOARD_TOKEN))
    login = app.post("/login", data=b"token=" + b"x" * web.BODY_BYTES)
    assert (login.status_code, login.json) == (413, {"error": "the body is over 64 KiB"})
    big = app.post("/api/messages", data=b" " * (web.API_BODY_BYTES + 1), headers=BEARER)
    assert (big.status_code, big.json) == (413, {"error": "the body is over 5 MiB"})


def test_an_idempotency_key_answers_a_retry_without_writing_again(
    api: Checked, store: Store
) -> None:
    key = {**BEARER, "Idempotency-Key": "order-42"}
    body = [{"to": CHAT, "text": "Your order is ready", "in": "10m"}]
    first = api("POST", "/api/messages", json=body, headers=key)
    again = api("POST", "/api/messages", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and "Idempotent-Replayed" not in first.headers
    assert store.messages.collection.count_documents({}) == 1

    other = [{"to": CHAT, "text": "Your order is late", "in": "10m"}]
    for path, sent in (("/api/messages", other), ("/api/campaigns", body[0])):
        reused = api("POST", path, valid=False, json=sent, headers=key)
        assert reused.status_code == 422
        assert reused.json()["problems"] == [
            "Idempotency-Key: already used for another request (another body or route); "
            "a new request needs a new key"
        ]
    assert store.messages.collection.count_documents({}) == 1

    # A request refused as asked keeps no answer: corrected, it goes through with its key.
    fixed = {**BEARER, "Idempotency-Key": "order-43"}
    wrong = api("POST", "/api/messages", valid=False, json={"to": "1", "text": "x"}, headers=fixed)
    assert wrong.status_code == 422
    right = api("POST", "/api/messages", json={"to": CHAT, "text": "x"}, headers=fixed)
    assert right.status_code == 201

    # A campaign too.
    campaign = {"name": "Keyed", "text": "Hi", "recipients": [{"phone": "447700900001"}]}
    made = api("POST", "/api/campaigns", json=campaign, headers={**BEARER, "Idempotency-Key": "c"})
    redo = api("POST", "/api/campaigns", json=campaign, headers={**BEARER, "Idempotency-Key": "c"})
    assert made.status_code == redo.status_code == 201
    assert redo.json() == made.json() and made.json()["written"] == 1
    assert store.messages.collection.count_documents({}) == 3
    kept = store.requests.collection.find_one({"_id": "order-42"})
    assert kept is not None and kept["answer"]["code"] == 201
    indexes = store.requests.collection.index_information()
    assert indexes["poller_request_expiry"]["expireAfterSeconds"] == 24 * 3600


def test_a_message_is_looked_up_and_cancelled_while_it_waits(
    api: Checked, store: Store, settings: Settings
) -> None:
    written = api("POST", "/api/messages", json={"to": CHAT, "text": "Later", "in": "1h"})
    [waiting] = written.json()["ids"]
    shown = api("GET", f"/api/messages/{waiting}").json()
    assert (shown["status"], shown["plannedAt"], shown["final"]) == ("waiting", None, False)

    cancelled = api("POST", f"/api/messages/{waiting}/cancel")
    assert cancelled.status_code == 200
    assert (cancelled.json()["status"], cancelled.json()["final"]) == ("cancelled", True)
    assert cancelled.json()["lastError"] == "Not sent: it was cancelled through poller's API."
    twice = api("POST", f"/api/messages/{waiting}/cancel")
    assert twice.status_code == 409
    assert twice.json()["error"] == "not cancelled: it has ended: cancelled"

    claimed = store.messages.collection.insert_one(
        {**message(utcnow()), "isPicked": True, "status": "sending"}
    ).inserted_id
    busy = api("POST", f"/api/messages/{claimed}/cancel")
    assert busy.status_code == 409
    assert busy.json()["error"] == "not cancelled: it is being sent: a poller has claimed it"
    assert busy.json()["message"]["status"] == "sending"

    marked = store.messages.collection.insert_one({**message(utcnow()), "isDeleted": True})
    done = api("POST", f"/api/messages/{marked.inserted_id}/cancel")
    assert done.status_code == 409 and done.json()["message"]["status"] == "done"
    assert done.json()["error"] == (
        "not cancelled: the web app marked it done (isSent, isDeleted) or handles it (isPicked)"
    )

    for method, path in (("GET", "/api/messages/{}"), ("POST", "/api/messages/{}/cancel")):
        unknown = api(method, path.format("0" * 24))
        assert unknown.status_code == 404
        assert unknown.json() == {"error": f"no message has the id {'0' * 24}"}
        malformed = api(method, path.format("nope"))
        assert malformed.status_code == 400
        assert malformed.json() == {"error": "id: 'nope' is not a message id (24 hex digits)"}


def test_the_pages_own_calls_need_its_csrf_token_and_origin(api: Checked, store: Store) -> None:
    base = str(api.http.base_url)
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as page:
        assert page.post("/login", data={"token": DASHBOARD_TOKEN}).status_code == 303
        csrf = page.get("/api/status").json()["csrf"]
        body = {"to": CHAT, "text": "From the page"}
        assert page.post("/api/messages", json=body).status_code == 403
        evil = {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
        assert page.post("/api/messages", json=body, headers=evil).status_code == 403
        assert store.messages.collection.count_documents({}) == 0
        own = {"X-CSRF-Token": csrf, "Origin": base}
        written = page.post("/api/messages", json=body, headers=own)
        assert written.status_code == 201
        [sent] = written.json()["ids"]
        assert page.get(f"/api/messages/{sent}").json()["status"] == "waiting"
        assert page.post(f"/api/messages/{sent}/cancel").status_code == 403
        assert page.post(f"/api/messages/{sent}/cancel", headers=own).status_code == 200


def test_a_campaign_dry_run_writes_nothing_and_plans_as_the_poller_then_does(
    store: Store, client: WahaClient, openapi: Any, settings: Settings
) -> None:
    now = utcnow()
    pacing = Pacing(10, 10)  # PACING_MIN_SECONDS == PACING_MAX_SECONDS: the plan is exact
    # A message already in the session's lane: the campaign is planned after it.
    store.messages.collection.insert_one(message(now, content="Before the campaign"))
    tick(store, client, 20, now=now, pacing=pacing)
    server, port = serve(store, pacing, clock=lambda: now)
    api = Checked(f"http://127.0.0.1:{port}", openapi)
    try:
        csv = "Phone;Name\n+44 7700 900001;Ann\n+44 7700 900002;Bob\n+44 7700 900003;Cy\n"
        body = {"name": "Spring", "text": "Hi {Name}", "csv": csv, "dryRun": True}
        dry = api("POST", "/api/campaigns", json=body)
        assert dry.status_code == 200, dry.text
        preview = dry.json()
        assert (preview["dryRun"], preview["name"], preview["messages"]) == (True, "Spring", 3)
        assert store.campaigns.collection.count_documents({}) == 0
        assert store.messages.collection.count_documents({}) == 1

        written = api("POST", "/api/campaigns", json={**body, "dryRun": False})
        assert written.status_code == 201
        answer = written.json()
        assert (answer["campaign"], answer["written"], answer["new"]) == (
            preview["campaign"],
            3,
            True,
        )
        again = api("POST", "/api/campaigns", json={**body, "dryRun": False})
        assert (again.json()["written"], again.json()["new"]) == (0, False)
    finally:
        api.close()
        server.shutdown()

    tick(store, client, 20, now=now, pacing=pacing)
    planned = sorted(
        d.get("plannedAt") or d["slotAt"]
        for d in store.messages.collection.find({"campaignId": {"$exists": True}})
    )
    plan = preview["preview"]
    assert [at.isoformat().replace("+00:00", "Z") for at in planned] == [
        _iso(now + seconds(10)),
        _iso(now + seconds(20)),
        _iso(now + seconds(30)),
    ]
    assert plan["sessions"]["default"] == {
        "messages": 3,
        "first": _iso(planned[0]),
        "last": _iso(planned[-1]),
    }
    assert plan["eta"] == _iso(planned[-1])
    texts = sorted(
        d["content"] for d in store.messages.collection.find({"campaignId": {"$ne": None}})
    )
    assert texts == ["Hi Ann", "Hi Bob", "Hi Cy"]


def test_a_campaigns_problems_name_its_rows_and_fields(api: Checked, store: Store) -> None:
    def problems(body: dict[str, Any]) -> list[str]:
        answer = api("POST", "/api/campaigns", valid=False, json=body)
        assert answer.status_code == 422, answer.text
        return answer.json()["problems"]  # type: ignore[no-any-return]

    csv = "phone,name\n447700900001,Ann\n12,Bob\n447700900003,\n447700900001,Ann\n"
    assert problems({"name": "C", "text": "Hi {name}", "csv": csv}) == [
        "row 3: '12' is not a phone number or WhatsApp chat id",
        "row 4: {name} empty in this row",
        "row 5: 447700900001@c.us is also on row 2",
    ]
    recipients = [{"phone": "447700900001", "name": "Ann"}, {"phone": "12", "name": "Bob"}]
    recipients.append({"phone": "447700900001", "name": "Ann"})
    assert problems({"name": "C", "text": "Hi {name}", "recipients": recipients}) == [
        "recipients[1]: '12' is not a phone number or WhatsApp chat id",
        "recipients[2]: 447700900001@c.us is also in recipients[0]",
    ]
    assert problems({"text": "Hi {nome}", "recipients": recipients[:1], "at": "2020-01-01"}) == [
        "at: 2020-01-01T00:00:00+00:00 is more than 120 s in the past: it would expire unsent",
        "name: a campaign needs a name",
        "text: {nome} names no column (phone, name)",
    ]
    assert problems({"name": "C", "text": "Hi", "csv": "phone\n", "colour": 1}) == [
        "colour: not a field of a campaign"
    ]
    assert problems({"name": "C", "text": "Hi", "csv": "phone\n"}) == [
        "csv: no rows below the header"
    ]
    assert problems({"name": "C", "text": "Hi"}) == [
        "recipients: give the recipients (a list of objects), or csv: a CSV text"
    ]
    assert problems({"name": "C", "text": "Hi", "csv": "phone\n1\n", "recipients": []}) == [
        "recipients and csv: give one of them, not both"
    ]
    assert problems({"name": "C", "text": "Hi", "recipients": [{"tel": "1"}]}) == [
        "column: no column named phone or chatId (tel): name the recipient's column"
    ]
    assert store.campaigns.collection.count_documents({}) == 0
    assert store.messages.collection.count_documents({}) == 0


def _status(port: int, request_line: str, header: str) -> int:
    """The status of the answer to a request of only a request line and headers."""
    head = f"{request_line} HTTP/1.1\r\nHost: poller\r\nAuthorization: Bearer {DASHBOARD_TOKEN}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{head}\r\n{header}\r\n\r\n".encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False
