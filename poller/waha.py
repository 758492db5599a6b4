"""The WAHA HTTP client: one long-lived connection pool, every response turned into an Outcome."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from poller import __version__


class Verdict(enum.Enum):
    SENT = "sent"
    RETRY = "retry"  # not sent; try again later
    FAILED = "failed"  # final: not sent, or not safe to send again
    UNKNOWN = "unknown"  # final: WAHA may have sent it; it must not be sent again
    # WAHA refused this poller's settings for the server: its API key, or (`wrong_url`) a URL
    # under which it serves none of its routes. Stop talking to that server this tick.
    REJECTED_KEY = "rejected_key"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str = ""  # a sentence for the person reading lastError
    message_id: str | None = None
    status_code: int | None = None
    # The request reached WAHA but no answer came back: WhatsApp may have the message.
    ambiguous: bool = False
    # No connection to WAHA at all: nothing else would get through either.
    unreachable: bool = False
    # With REJECTED_KEY: no route serves the path (Express's "Cannot POST /api/api/sendText"),
    # so the server's URL setting is wrong, not its key nor the session.
    wrong_url: bool = False


class WahaClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_seconds: float,
        key_variable: str = "WAHA_API_KEY",
        url_variable: str = "WAHA_URL",
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("WAHA base URL must start with http:// or https://")
        if timeout_seconds <= 0:
            raise ValueError("WAHA timeout must be positive")
        if not (api_key.isascii() and api_key.isprintable()):
            # Never the key itself in the message: it is a secret.
            raise ValueError("WAHA API key must be printable ASCII: an HTTP header cannot carry it")
        headers = {"User-Agent": f"poller/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["X-Api-Key"] = api_key
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout_seconds
        self.key_variable = key_variable  # where the key is set, for the reason it is refused
        self.url_variable = url_variable  # and the URL, for the reason no route serves it
        # False once this WAHA has shown it cannot pre-generate message ids (older versions).
        self.offers_ids = True
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            # Connecting fails fast; the read waits past WAHA's 5 s session check.
            timeout=_timeout(timeout_seconds),
            # WAHA closes a connection idle 5 s (Keep-Alive: timeout=5): drop ours before it does.
            limits=httpx.Limits(keepalive_expiry=4.0),
        )

    def close(self) -> None:
        self._http.close()

    def send_text(
        self, session: str, chat_id: str, text: str, message_id: str | None = None
    ) -> Outcome:
        """Send one text. With `message_id` (pre-generated), WAHA delivers it at most once."""
        body = {"session": session, "chatId": chat_id, "text": text}
        if message_id:
            body["id"] = message_id
        return self._post("/api/sendText", body, session)

    def send_media(
        self, session: str, chat_id: str, file: dict[str, str], caption: str | None, image: bool
    ) -> Outcome:
        """Send an image (`/api/sendImage`) or any other file (`/api/sendFile`): `file` holds
        its mimetype, a url or base64 data, and optionally a filename."""
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "file": file}
        if caption:
            body["caption"] = caption
        return self._post("/api/sendImage" if image else "/api/sendFile", body, session)

    def chat_action(self, path: str, session: str, chat_id: str) -> Outcome:
        """`/api/sendSeen`, `/api/startTyping` or `/api/stopTyping` for a chat, answered like a
        send: WAHA's 404/422 for a session that cannot send come after its own 5 s wait."""
        body = {"session": session, "chatId": chat_id}
        return self._post(path, body, session)

    def _post(self, path: str, body: dict[str, Any], session: str) -> Outcome:
        try:
            response = self._http.post(path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return self._unreachable(exc)
        except httpx.WriteTimeout as exc:  # the request was not fully sent: WAHA cannot act on it
            return Outcome(Verdict.RETRY, f"WAHA did not take the request in time ({_kind(exc)})")
        except httpx.TimeoutException as exc:
            reason = f"WAHA did not answer in time ({_kind(exc)})"
            return Outcome(Verdict.RETRY, reason, ambiguous=True)
        except httpx.HTTPError as exc:
            reason = f"the connection to WAHA broke ({_kind(exc)})"
            return Outcome(Verdict.RETRY, reason, ambiguous=True)
        code, body = response.status_code, _json(response)
        return self._misrouted(code, body, path) or classify(code, body, session, self.key_variable)

    def new_message_id(self, session: str) -> str | Outcome | None:
        """A pre-generated id for the next message (WAHA 2026.4.3+, NOWEB and GOWS engines).

        None when this WAHA does not offer ids (remembered: not asked again); an Outcome when
        the request failed in a way that stops this message for now (nothing was sent). Never
        a SENT outcome: this request sends nothing.
        """
        if not self.offers_ids:
            return None
        path = f"/api/{_segment(session)}/new-message-id"
        try:
            response = self._http.get(path)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return self._unreachable(exc)
        except httpx.HTTPError as exc:
            return Outcome(Verdict.RETRY, f"WAHA gave no message id ({_kind(exc)})")
        code, body = response.status_code, _json(response)
        said = _said(body)
        if 200 <= code < 300:
            if isinstance(body, dict) and isinstance(body.get("id"), str) and body["id"]:
                return str(body["id"])
            reason = (
                "WAHA answered new-message-id without a message id "
                f"({code}, {_content_type(response)})"
            )
            return Outcome(Verdict.RETRY, reason, status_code=code)
        if _unrouted(code, body) == path or (code == 422 and "not implemented" in said):
            self.offers_ids = False  # this WAHA has no such route, or its engine has no ids
            return None
        if wrong := self._misrouted(code, body, path):
            return wrong
        if code == 404 and "find a session" in said:
            return classify(code, body, session, self.key_variable)
        if code in (404, 405) or code >= 500:
            reason = f"WAHA gave no message id ({code}{said or ', ' + _content_type(response)})"
            return Outcome(Verdict.RETRY, reason, None, code)
        return classify(code, body, session, self.key_variable)

    def _misrouted(self, code: int, body: Any, path: str) -> Outcome | None:
        """A refusal of the server's URL setting when the answer to `path` is Express's own 404
        for a path no route serves, and the path it quotes shows why: WAHA received it under a
        prefix (a URL ending in /api, as every URL in WAHA's docs does), or whatever answers has
        no WAHA route there. None for any other answer (one that quotes another path is unclear).
        """
        quoted = _unrouted(code, body)
        if quoted is None or not quoted.endswith(path):
            return None
        prefix, variable = quoted.removesuffix(path), self.url_variable
        if prefix.endswith("/api") or "/api/api/" in quoted:
            fix = f"{variable} should be the server's root, without /api"
            if self.base_url.endswith("/api"):
                fix += f" ({self.base_url.removesuffix('/api')})"
        elif prefix:
            fix = f"{variable} should be the WAHA server's root URL, without {prefix}"
        else:
            fix = f"is {variable} the WAHA server's URL (not the web app's)?"
        reason = f"{self.base_url} answered 404 '{_message(body)[:200]}': {fix}"
        return Outcome(Verdict.REJECTED_KEY, reason, None, code, wrong_url=True)

    def _unreachable(self, exc: Exception) -> Outcome:
        reason = f"WAHA at {self.base_url} could not be reached ({_kind(exc)})"
        return Outcome(Verdict.RETRY, reason, unreachable=True)

    def phone_of(self, session: str, lid: str) -> str | None:
        """The phone number's chat id of an `@lid` chat (`GET /api/{session}/lids/{lid}`,
        WAHA 2025.5.4+), or None when WAHA does not know it or has no such route."""
        path = f"/api/{_segment(session)}/lids/{_segment(lid)}"
        try:
            response = self._http.get(path, timeout=_timeout(min(5.0, self.timeout)))
        except httpx.HTTPError:
            return None
        body = _json(response)
        found = body.get("pn") if response.status_code == 200 and isinstance(body, dict) else None
        return found if isinstance(found, str) and found else None

    def sessions(self) -> list[dict[str, str]] | Outcome:
        """Every session's name and status (`GET /api/sessions?all=true`), or why not."""
        try:
            response = self._http.get("/api/sessions", params={"all": "true"})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return self._unreachable(exc)
        except httpx.HTTPError as exc:
            return Outcome(Verdict.RETRY, f"WAHA did not list its sessions ({_kind(exc)})")
        code, body = response.status_code, _json(response)
        if code in (401, 403):
            return classify(code, body, "", self.key_variable)
        if wrong := self._misrouted(code, body, "/api/sessions"):
            return wrong
        if code != 200 or not isinstance(body, list):
            reason = f"WAHA did not list its sessions ({code}{_said(body)})"
            return Outcome(Verdict.RETRY, reason, None, code)
        return [
            {"name": str(s.get("name")), "status": str(s.get("status"))}
            for s in body
            if isinstance(s, dict)
        ]


def classify(code: int, body: Any, session: str, key_variable: str = "WAHA_API_KEY") -> Outcome:
    """Sort one sendText response into sent, retry later, failed for good, or a rejected key
    (`key_variable`: the setting that holds the key)."""
    said = _said(body)
    if 200 <= code < 300:
        return Outcome(Verdict.SENT, message_id=_message_id(body), status_code=code)
    if code in (401, 403):
        return Outcome(
            Verdict.REJECTED_KEY, f"WAHA rejected the API key (check {key_variable})", None, code
        )
    if code == 404 and _unrouted(code, body) is not None:
        # Express's answer for a path no route serves: nothing to do with the session.
        return Outcome(Verdict.RETRY, f"WAHA has no such route (404{said})", None, code)
    if code == 404:
        reason = f"WhatsApp session '{session}' is not started on WAHA"
        return Outcome(Verdict.RETRY, reason, None, code)
    if code == 422 and isinstance(body, dict) and "status" in body:
        reason = f"WhatsApp session '{session}' is {body.get('status')}, not WORKING"
        return Outcome(Verdict.RETRY, reason, None, code)
    if code in (408, 425, 429):
        return Outcome(Verdict.RETRY, f"WAHA asked to try later ({code}{said})", None, code)
    if code >= 500:
        reason = (
            f"WAHA failed while sending ({code}{said}); not retried, because WhatsApp may "
            "have received it: check the chat before sending it again"
        )
        return Outcome(Verdict.FAILED, reason, None, code)
    return Outcome(Verdict.FAILED, f"WAHA refused the message ({code}{said})", None, code)


def _segment(value: str) -> str:
    """`value` as one path segment: percent-encoded, dots too, so it cannot address another route
    (`quote` leaves `.` and `..` alone, and httpx would resolve them)."""
    return quote(value, safe="").replace(".", "%2E")


# Express's own 404 for a path no route serves, as NestJS words it (the path as requested).
_NO_ROUTE = re.compile(r"Cannot (?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) (/\S*)")


def _unrouted(code: int, body: Any) -> str | None:
    """The path (without its query) that Express's own 404 says no route serves (`Cannot GET
    /api/default/new-message-id`), unlike WAHA's 404 for a session it does not know; None for
    any other answer."""
    found = _NO_ROUTE.fullmatch(_message(body)) if code == 404 else None
    return found.group(1).split("?")[0] if found else None


def _message(body: Any) -> str:
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else ""


def _content_type(response: httpx.Response) -> str:
    return str(response.headers.get("Content-Type", "no content type")).split(";")[0].strip()


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _said(body: Any) -> str:
    """WAHA's own words from an error body, shortened: ': <message>' or ''."""
    if not isinstance(body, dict):
        return ""
    text = body.get("message") or body.get("error")
    exception = body.get("exception")
    if isinstance(exception, dict) and exception.get("message"):
        text = exception["message"]
    if isinstance(text, list):
        text = "; ".join(str(t) for t in text)
    if not text:
        return ""
    text = " ".join(str(text).split())
    return f": {text[:200]}"


def _message_id(body: Any) -> str | None:
    """The id of a sent message in WAHA's 201, whatever its engine: GOWS (and the published
    spec) a string `id`, `true_<chat>_<id>`; WEBJS an object whose `_serialized` is that (or
    whose `id` is the bare id, in builds where WhatsApp Web renamed `_serialized`); NOWEB the
    raw Baileys message, whose `key.id` is the bare id."""
    if not isinstance(body, dict):
        return None
    for raw in (body, body.get("_data")):
        if not isinstance(raw, dict):
            continue
        given, key = raw.get("id"), raw.get("key")
        if isinstance(given, dict):
            given = given.get("_serialized") or given.get("id")
        if isinstance(key, dict):
            given = given or key.get("id")
        if isinstance(given, str) and given:
            return given
    return None


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(5.0, seconds))


def _kind(exc: Exception) -> str:
    return type(exc).__name__
