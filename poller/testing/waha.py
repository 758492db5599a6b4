"""A WAHA-compatible HTTP server on 127.0.0.1 for the demo and the tests.

It answers /api/sendText, /api/sendImage, /api/sendFile, /api/sendSeen, /api/startTyping,
/api/stopTyping, /api/sessions and /ping with WAHA's codes and bodies (see WAHA's CONTRACT: 201
with a WAMessage, 401 for a wrong key, 404 for an unknown session, 422 after a wait when the
session is not WORKING, 500 for engine errors) and records every request. Like WAHA, it sends
`Keep-Alive: timeout=5` and closes a connection left idle that long.
"""

from __future__ import annotations

import json
import random
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


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
    # WAHA Core as observed (2024.10.8): `default` is always listed, any other session gets a
    # 422 on every send route, and there is no new-message-id route.
    core: bool = False
    # A kept-alive connection idle this long is closed, as WAHA (Node) does after 5 s.
    keepalive_seconds: float = 5.0
    # path -> (code, content type, body text), answered instead of the route: odd answers.
    raw_answers: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # GET /api/sessions waits this long before it answers: a hanging WAHA.
    listing_delay: float = 0.0
    # Called with each message delivered (once per message id), as WAHA would emit its events.
    on_send: Callable[[SentMessage], None] | None = None
    # How sendText's 201 carries the message id, as each engine answers it (WAHA passes the
    # engine's object through): "" the published spec's WAMessage (a string `id`, as GOWS),
    # "NOWEB" the raw Baileys message (`key.id`, no `id`), "WEBJS" whatsapp-web.js's message
    # (`id` an object with `_serialized`), "GOWS" `{id, _data}`.
    engine: str = ""
    # `@lid` -> phone chat id, as GET /api/{session}/lids/{lid} answers it (WAHA 2025.5.4+;
    # `core` answers that route with 404, as 2024.10.8 does).
    lids: dict[str, str] = field(default_factory=dict)

    requests: list[Request] = field(default_factory=list)
    sent: list[SentMessage] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    connections_opened: int = 0
    connections_closed_idle: int = 0  # closed by the simulator after keepalive_seconds idle

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
            answered = False  # on this connection, so far

            def do_GET(self) -> None:
                simulator._handle(self, "GET")

            def do_POST(self) -> None:
                simulator._handle(self, "POST")

            def setup(self) -> None:
                super().setup()
                with simulator._lock:
                    simulator._connections.add(self.connection)
                    simulator.connections_opened += 1

            def handle_one_request(self) -> None:
                # Like Node's keepAliveTimeout: idle time counts from the last answer sent.
                wait = simulator.keepalive_seconds
                if self.answered and not select.select([self.connection], [], [], wait)[0]:
                    simulator._close_idle(self.connection)
                    self.close_connection = True
                    return
                super().handle_one_request()
                self.answered = True

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
        # The default 0.5 s poll would add up to 0.5 s to every stop().
        serve = self._server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True).start()
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

    def _close_idle(self, connection: socket.socket) -> None:
        """Close a connection nobody used for keepalive_seconds, then count it: a client that
        sees the count has also seen the close."""
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self.connections_closed_idle += 1

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
        if request.path in self.raw_answers:
            code, content_type, text = self.raw_answers[request.path]
            payload = text.encode()
        else:
            code, body = self._answer(request)
            content_type, payload = "application/json; charset=utf-8", json.dumps(body).encode()
        http.send_response(code)
        http.send_header("Content-Type", content_type)
        http.send_header("Content-Length", str(len(payload)))
        http.send_header("Connection", "keep-alive")
        http.send_header("Keep-Alive", f"timeout={self.keepalive_seconds:g}")
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
            time.sleep(self.listing_delay)
            if self.listing_fails > 0:
                self.listing_fails -= 1
                return 502, {"message": "Bad Gateway"}
            return 200, [self._session_info(name) for name in self._listed()]
        if request.method == "GET" and request.path.startswith("/api/sessions/"):
            name = unquote(request.path.removeprefix("/api/sessions/"))
            if name not in self._listed():
                return _error(404, f"We didn't find a session with name '{name}'.")
            return 200, self._session_info(name)
        if request.method == "POST" and request.path in SENDS + CHAT_ACTIONS:
            body = _body(request)
            if not isinstance(body, dict):
                return body
            if self.core and body.get("session") != "default":
                return _error(422, CORE_ONLY)  # at once, before any look at the session
            if request.path in SENDS:
                return self._send(request.path, body)
            if not self.chat_actions:
                return _error(422, "The method is not implemented by the engine.")
            return self._session_problem(body.get("session")) or (201, {"result": True})
        parts = request.path.split("/")  # ["", "api", session, "new-message-id"]
        if (
            self.message_ids
            and not self.core
            and request.method == "GET"
            and len(parts) == 4
            and parts[:2] == ["", "api"]
            and parts[3] == "new-message-id"
        ):
            session = unquote(parts[2])
            return self._session_problem(session) or (200, {"id": secrets.token_hex(10).upper()})
        if not self.core and request.method == "GET" and len(parts) == 5 and parts[3] == "lids":
            session, lid = unquote(parts[2]), unquote(parts[4])
            return self._session_problem(session) or (200, {"lid": lid, "pn": self.lids.get(lid)})
        # Express's answer for a path no route serves: it quotes the path as requested.
        query = f"?{request.query}" if request.query else ""
        return _error(404, f"Cannot {request.method} {request.path}{query}")

    def _listed(self) -> dict[str, str]:
        """Session name -> status, as GET /api/sessions?all=true lists them."""
        return {"default": "STOPPED", **self.sessions} if self.core else self.sessions

    def _session_problem(self, session: object) -> tuple[int, Any] | None:
        """WAHA's answer when `session` cannot send: 404 not started, 422 not WORKING."""
        listed = self._listed()
        if session not in listed or listed[str(session)] == "STOPPED":
            return _error(
                404,
                f"We didn't find a session with name '{session}'.\nPlease start it first by "
                f"using POST /api/sessions/{session}/start request",
            )
        status = listed[str(session)]
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

    def _send(self, route: str, body: dict[str, Any]) -> tuple[int, Any]:
        session = body.get("session")
        problem = self._session_problem(session)
        if problem:
            return problem
        time.sleep(self.latency)
        chat_id = str(body.get("chatId"))
        if chat_id in self.scripted:
            return self.scripted[chat_id]
        text = body.get("text") if route == "/api/sendText" else body.get("caption", "")
        if not isinstance(text, str):
            return engine_error("text is required")
        file = body.get("file")
        if route != "/api/sendText" and not isinstance(file, dict):
            return engine_error("file is required")
        given = body.get("id") if self.message_ids and not self.core else None
        chat = chat_id if "@" in chat_id else f"{chat_id}@c.us"  # WAHA appends @c.us
        message_id = f"true_{chat}_{given or secrets.token_hex(10).upper()}"
        if self.engine == "GOWS" and chat.endswith("@g.us"):
            message_id += f"_{ME_ID}"  # GOWS names a group message's sender after its id
        with self._lock:
            fault = self._random.random()
        if fault < self.error_rate / 2:
            return engine_error("Connection Closed")
        with self._lock:
            # Like WAHA: a message id already sent is not sent again; the same message answers.
            message = next((m for m in self.sent if given and m.id == message_id), None)
            if message is None:
                message = SentMessage(
                    message_id, str(session), chat_id, text, time.time(), route, file
                )
                self.sent.append(message)
                if self.on_send is not None:
                    threading.Thread(target=self.on_send, args=(message,), daemon=True).start()
            stall = chat_id in self.stall_after_send
            self.stall_after_send.discard(chat_id)
        if stall:
            time.sleep(self.stall)  # delivered, but the answer comes too late
        time.sleep(self.slow_sessions.get(str(session), 0.0))
        if fault < self.error_rate:
            return engine_error("Timed Out")
        return 201, self._sent_body(message, file is not None)

    def _sent_body(self, message: SentMessage, media: bool) -> dict[str, Any]:
        """sendText's 201 body for `message`, as `engine` shapes it."""
        key = message.id.split("_")[2]
        if self.engine == "NOWEB":
            return {
                "key": {
                    "remoteJid": message.chat_id.replace("@c.us", "@s.whatsapp.net"),
                    "fromMe": True,
                    "id": key,
                },
                "message": {"extendedTextMessage": {"text": message.text}},
                "messageTimestamp": str(int(message.at)),
                "status": "PENDING",
            }
        if self.engine == "WEBJS":
            serialized = {
                "fromMe": True,
                "remote": message.chat_id,
                "id": key,
                "_serialized": message.id,
            }
            return {
                "_data": {"id": serialized, "body": message.text, "type": "chat"},
                "id": serialized,
                "ack": 0,
                "hasMedia": media,
                "body": message.text,
                "type": "chat",
                "timestamp": int(message.at),
                "from": ME_ID,
                "to": message.chat_id,
                "fromMe": True,
            }
        if self.engine == "GOWS":
            return {"id": message.id, "_data": {"Info": {"ID": key}}}
        return {
            "id": message.id,
            "timestamp": int(message.at),
            "from": ME_ID,
            "fromMe": True,
            "source": "api",
            "to": message.chat_id,
            "body": message.text,
            "hasMedia": media,
            "ack": 1,
            "ackName": "SERVER",
            "_data": {},
        }

    def _session_info(self, name: str) -> dict[str, Any]:
        status = self._listed()[name]
        me = {"id": ME_ID, "pushName": name} if status == "WORKING" else None
        if self.core:
            return {"name": name, "status": status, "config": None, "me": me}  # as observed
        # SessionInfo as the published spec has it: `me` only once connected, never null.
        info: dict[str, Any] = {"name": name, "status": status, "presence": {}, "engine": {}}
        info["timestamps"] = {"activity": int(time.time() * 1000)}
        if me:
            info["me"] = me
        return info


SENDS = ("/api/sendText", "/api/sendImage", "/api/sendFile")
ME_ID = "15550001111@c.us"  # the WhatsApp account of every session
CHAT_ACTIONS = ("/api/sendSeen", "/api/startTyping", "/api/stopTyping")
CORE_ONLY = (
    "WAHA Core support only 'default' session. If you want to run more then one WhatsApp "
    "account - please get WAHA PLUS version. Check this out: https://waha.devlike.pro/"
)


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
