"""The HTTP server of `poller run` (HEALTH_PORT), on waitress, with bounds on what a client holds.

One thread runs waitress's event loop: it reads every request whole (headers, then the body up
to its size limit) before a worker thread sees it, so a slow or silent client holds a socket
and a few kilobytes, never a thread. The workers are few and fixed, connections are capped,
and one that goes quiet, or takes too long to send its request, is closed.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Worker threads that run the app. Its answers are quick (memory, or one cached read of
# MongoDB for the dashboard), and these are all the threads the server ever starts, however
# many clients connect: the tick's send pool is never starved of them.
THREADS = 4
# Open connections at most (each is a file descriptor and a few KiB). Beyond it the server
# stops accepting: new ones wait in the kernel's listen backlog until a timeout frees a slot.
CONNECTION_LIMIT = 200
# A connection silent this long is closed: an idle keep-alive, or a request that stalled.
IDLE_SECONDS = 10
# A request not received whole this long after its first byte is closed, however steadily it
# trickles in (the idle timeout alone lets a byte every few seconds hold a connection forever).
REQUEST_SECONDS = 30
# How often the loop looks for connections past those two limits: they are enforced this late
# at most.
CLEANUP_SECONDS = 1
# The request line and headers together, at most: 431 beyond.
HEADER_BYTES = 16 * 1024
# A request's body, at most, unless the caller allows more (WAHA's events): 413 beyond, decided
# from Content-Length before any of the body is read. The dashboard's log-in form is tiny.
BODY_BYTES = 64 * 1024
# The dashboard's API takes a campaign's CSV in one body (tens of thousands of rows): the body
# of these routes only may reach this, when the caller allows it (the dashboard is on).
API_BODY_BYTES = 5 * 1024 * 1024
LARGE_BODIES = ("/api/messages", "/api/campaigns")

# One warning per request while all workers are busy ("Task queue depth is 3"): noise under
# load. waitress's other warnings (the connection limit reached, an app error) reach loguru
# through the stdlib logging handler that poller.log sets up.
logging.getLogger("waitress.queue").setLevel(logging.ERROR)


class Server:
    """The server running in its thread; `shutdown()` stops it."""

    def __init__(
        self, sockets: dict[int, Any], listeners: list[_Listener], dispatcher: Any
    ) -> None:
        self._map, self._listeners, self._dispatcher = sockets, listeners, dispatcher
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="http", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            # Wakes at least every CLEANUP_SECONDS: the timeouts hold without any traffic.
            wasyncore.loop(timeout=CLEANUP_SECONDS, use_poll=True, map=self._map, count=1)

    def shutdown(self) -> None:
        """Stop the loop, let the workers finish the requests they hold (5 s at most), and
        close every socket."""
        self._stopping.set()
        self._listeners[0].pull_trigger()  # wakes the loop's poll at once
        self._thread.join()
        self._dispatcher.shutdown(timeout=5)
        wasyncore.close_all(self._map)


def serve(
    app: WsgiApp, host: str, port: int, max_body: int = BODY_BYTES, large_body: int = 0
) -> Server:
    """Serve `app` on `host`:`port` (every address the host name has) from a daemon thread.
    Bodies up to `max_body`, and up to `large_body` on the LARGE_BODIES routes when it is
    larger. Raises OSError when an address cannot be bound."""
    adj = Adjustments(
        host=host,
        port=port,
        threads=THREADS,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=IDLE_SECONDS,
        cleanup_interval=CLEANUP_SECONDS,
        max_request_header_size=HEADER_BYTES,
        # waitress refuses a body of max_request_body_size
        max_request_body_size=max(max_body, large_body) + 1,
        # X-Forwarded-Proto reaches the dashboard, which marks its cookie Secure behind TLS.
        clear_untrusted_proxy_headers=False,
        log_socket_errors=False,  # a client that resets its connection is not news
        ident="poller",
    )
    adj.elsewhere = copy.copy(adj)  # the limits of every route but LARGE_BODIES (_Parser)
    adj.elsewhere.max_request_body_size = max_body + 1
    dispatcher = ThreadedTaskDispatcher()  # its threads start once every address is bound
    sockets: dict[int, Any] = {}
    try:
        listeners = [
            _Listener(app, sockets, dispatcher=dispatcher, adj=adj, sockinfo=info)
            for info in adj.listen
        ]
    except OSError:
        wasyncore.close_all(sockets)
        raise
    dispatcher.set_thread_count(THREADS)
    return Server(sockets, listeners, dispatcher)


class _Parser(HTTPRequestParser):  # type: ignore[misc]  # waitress has no type hints
    """waitress's request parser, which holds a body to the larger limit on the LARGE_BODIES
    routes only: it reads the limit once the request line is parsed, and before any of the
    body."""

    adj: Any

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.path not in LARGE_BODIES:
            self.adj = self.adj.elsewhere


class _Channel(HTTPChannel):  # type: ignore[misc]
    """A connection that notes when the request it is receiving began."""

    parser_class = _Parser
    request_began = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_began = time.time()  # waitress's own clock for its timeouts
        return bool(super().received(data))


class _Listener(TcpWSGIServer):  # type: ignore[misc]
    """waitress's listening socket, which also closes a connection whose request has been
    arriving for over REQUEST_SECONDS."""

    channel_class = _Channel

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        cutoff = now - REQUEST_SECONDS
        for channel in self.active_channels.values():
            if channel.request is not None and not channel.requests:
                if channel.request_began < cutoff:
                    channel.will_close = True
