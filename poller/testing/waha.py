"""A WAHA-compatible HTTP server on 127.0.0.1 for the demo and the tests.

It answers /api/sendText, /api/sendImage, /api/sendFile, /api/sendSeen, /api/startTyping,
/api/stopTyping, /api/sessions and /ping with WAHA's codes and bodies (see WAHA's CONTRACT: 201
with a WAMessage, 401 for a wrong key, 404 for an unknown session, 422 after a wait when the
session is not WORKING, 500 for engine errors) and records every request.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class SentMessage:
    id: str
    session: str
    chat_id: str
    text: str  # the caption, for media
    at: float
    route: str = "/api/sendText"
    file: dict[str, Any] | None = None  # sendImage and sendFile's `file`


@dataclass
class WahaSimulator:
    """Configure it by setting its fields; read `requests` and `sent` afterwards."""

    api_key: str | None = None  # None: no key is checked (like WAHA Core 2024.10.8)
    sessions: dict[str, str] = field(default_factory=lambda: {"default": "WORKING"})
    not_working_wait: float = 5.0  # WAHA polls the session for 5 s before its 422
    latency: float = 0.0  # added before every sendText answer
    # chatId -> (code, body): the engine's answer for that chat instead of a 201.
    scripted: dict[str, tuple[int, Any]] = field(default_factory=dict)
    # Pre-generated message ids (GET /api/{session}/new-message-id, `id` in sendText) as in
    # WAHA 2026.4.3+; False answers that route with 404, as older versions do.
    message_ids: bool = True
    # False answers sendSeen/startTyping/stopTyping with WAHA's 422 for an engine without them.
    chat_actions: bool = True
    # The next this many session listings (GET /api/sessions) fail with a 502, as behind a proxy.
    listing_fails: int = 0
    # session -> seconds: its sends are delivered, then answered that much later (timeouts).
    slow_sessions: dict[str, float] = field(default_factory=dict)
    # chatIds whose next send is delivered but answered only after `stall` seconds (a timeout).
    stall_after_send: set[str] = field(default_factory=set)
    stall: float = 0.0
    # The share of sendText requests answered with an engine error (500); half of those are
    # delivered first, as when WhatsApp took the message and the engine then threw.
    error_rate: float = 0.0
    seed: int = 0
    # Called with every request; whatever it returns (an error text) is kept in `violations`.
    validator: Callable[[Request], str | None] | None = None

    requests: list[Request] = field(default_factory=list)
    sent: list[SentMessage] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(self.seed)
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "simulator not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self, port: int = 0) -> WahaSimulator:
        simulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle's algorithm and the
            # client's delayed ACK hold every answer back by about 40 ms.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                simulator._handle(self, "GET")

            def do_POST(self) -> None:
                simulator._handle(self, "POST")

            def setup(self) -> None:
                super().setup()
                with simulator._lock:
                    simulator._connections.add(self.connection)

            def finish(self) -> None:
                with simulator._lock:
                    simulator._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass  # the client gave up waiting (a timeout) or the simulator stopped

            def handle(self) -> None:
                try:
                    super().handle()
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Go down like a WAHA server that stopped: connections kept alive are closed too."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    def __enter__(self) -> WahaSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sends_to(self, chat_id: str) -> list[SentMessage]:
        with self._lock:
            return [m for m in self.sent if m.chat_id == chat_id]

    def message_requests(self) -> list[Request]:
        """Every request made for a message: all but the session listing (GET /api/sessions)."""
        with self._lock:
            return [r for r in self.requests if r.path != "/api/sessions"]

    def requests_to(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- request handling -------------------------------------------------------------------------

    def _handle(self, http: BaseHTTPRequestHandler, method: str) -> None:
        length = int(http.headers.get("Content-Length") or 0)
        parts = urlsplit(http.path)
        request = Request(
            method,
            parts.path,
            parts.query,
            dict(http.headers.items()),
            http.rfile.read(length),
            time.time(),
        )
        with self._lock:
            self.requests.append(request)
        if self.validator is not None:
            problem = self.validator(request)
            if problem:
                with self._lock:
                    self.violations.append(f"{method} {parts.path}: {problem}")
        code, body = self._answer(request)
        payload = json.dumps(body).encode()
        http.send_response(code)
        http.send_header("Content-Type", "application/json; charset=utf-8")
        http.send_header("Content-Length", str(len(payload)))
        http.end_headers()
        http.wfile.write(payload)

    def _answer(self, request: Request) -> tuple[int, Any]:
        if request.path == "/ping":
            return 200, {"message": "pong"}
        if not request.path.startswith("/api/"):
            return _error(404, f"Cannot {request.method} {request.path}")
        if self.api_key is not None and request.headers.get("X-Api-Key") != self.api_key:
            return 401, {"message": "Unauthorized", "statusCode": 401}
        if request.method == "GET" and request.path == "/api/sessions":
            if self.listing_fails > 0:
                self.listing_fails -= 1
                return 502, {"message": "Bad Gateway"}
            return 200, [self._session_info(name) for name in self.sessions]
        if request.method == "GET" and request.path.startswith("/api/sessions/"):
            name = request.path.removeprefix("/api/sessions/")
            if name not in self.sessions:
                return _error(404, f"We didn't find a session with name '{name}'.")
            return 200, self._session_info(name)
        if request.method == "POST" and request.path in SENDS:
            return self._send(request)
        if request.method == "POST" and request.path in CHAT_ACTIONS:
            body = _body(request)
            if not isinstance(body, dict):
                return body
            if not self.chat_actions:
                return _error(422, "The method is not implemented by the engine.")
            return self._session_problem(body.get("session")) or (201, {"result": True})
        if (
            self.message_ids
            and request.method == "GET"
            and request.path.startswith("/api/")
            and request.path.endswith("/new-message-id")
        ):
            session = request.path.split("/")[2]
            return self._session_problem(session) or (200, {"id": secrets.token_hex(10).upper()})
        return _error(404, f"Cannot {request.method} {request.path}")

    def _session_problem(self, session: object) -> tuple[int, Any] | None:
        """WAHA's answer when `session` cannot send: 404 not started, 422 not WORKING."""
        if session not in self.sessions or self.sessions[str(session)] == "STOPPED":
            return _error(
                404,
                f"We didn't find a session with name '{session}'.\nPlease start it first by "
                f"using POST /api/sessions/{session}/start request",
            )
        status = self.sessions[str(session)]
        if status != "WORKING":
            time.sleep(self.not_working_wait)
            return 422, {
                "error": (
                    "Session status is not as expected. Try again later or restart the session"
                ),
                "session": session,
                "status": status,
                "expected": ["WORKING"],
            }
        return None

    def _send(self, request: Request) -> tuple[int, Any]:
        body = _body(request)
        if not isinstance(body, dict):
            return body
        session = body.get("session")
        problem = self._session_problem(session)
        if problem:
            return problem
        time.sleep(self.latency)
        chat_id = str(body.get("chatId"))
        if chat_id in self.scripted:
            return self.scripted[chat_id]
        text = body.get("text") if request.path == "/api/sendText" else body.get("caption", "")
        if not isinstance(text, str):
            return engine_error("text is required")
        file = body.get("file")
        if request.path != "/api/sendText" and not isinstance(file, dict):
            return engine_error("file is required")
        given = body.get("id") if self.message_ids else None
        message_id = f"true_{chat_id}_{given or secrets.token_hex(10).upper()}"
        with self._lock:
            fault = self._random.random()
        if fault < self.error_rate / 2:
            return engine_error("Connection Closed")
        with self._lock:
            # Like WAHA: a message id already sent is not sent again; the same message answers.
            message = next((m for m in self.sent if given and m.id == message_id), None)
            if message is None:
                message = SentMessage(
                    message_id, str(session), chat_id, text, time.time(), request.path, file
                )
                self.sent.append(message)
            stall = chat_id in self.stall_after_send
            self.stall_after_send.discard(chat_id)
        if stall:
            time.sleep(self.stall)  # delivered, but the answer comes too late
        time.sleep(self.slow_sessions.get(str(session), 0.0))
        if fault < self.error_rate:
            return engine_error("Timed Out")
        return 201, {
            "id": message.id,
            "timestamp": int(message.at),
            "from": "15550001111@c.us",
            "fromMe": True,
            "source": "api",
            "to": chat_id,
            "body": text,
            "hasMedia": file is not None,
            "ack": 1,
            "ackName": "SERVER",
            "_data": {},
        }

    def _session_info(self, name: str) -> dict[str, Any]:
        status = self.sessions[name]
        me = {"id": "15550001111@c.us", "pushName": name} if status == "WORKING" else None
        return {"name": name, "status": status, "config": None, "me": me, "engine": {}}


SENDS = ("/api/sendText", "/api/sendImage", "/api/sendFile")
CHAT_ACTIONS = ("/api/sendSeen", "/api/startTyping", "/api/stopTyping")


def _body(request: Request) -> dict[str, Any] | tuple[int, Any]:
    """The JSON object a POST carries, or WAHA's 400 for one that is not."""
    try:
        body = request.json()
    except ValueError as exc:
        return _error(400, f"Unexpected token in JSON: {exc}")
    return body if isinstance(body, dict) else _error(400, "Bad Request")


def _error(code: int, message: str) -> tuple[int, Any]:
    reasons = {400: "Bad Request", 404: "Not Found", 422: "Unprocessable Entity"}
    return code, {"statusCode": code, "message": message, "error": reasons.get(code, "Error")}


def engine_error(message: str, name: str = "Error") -> tuple[int, Any]:
    """WAHA's 500 for an exception thrown by the WhatsApp engine (usable in `scripted`)."""
    return 500, {
        "statusCode": 500,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "exception": {"message": message, "name": name},
    }
