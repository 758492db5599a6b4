"""Every WAHA answer sorted into sent, retry later, failed for good or a refused key."""

from __future__ import annotations

from typing import Any

import pytest

from poller.waha import Verdict, WahaClient, classify

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
