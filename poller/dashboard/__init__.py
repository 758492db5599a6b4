"""The web dashboard (DASHBOARD_TOKEN): one page, its JSON API, the campaign actions and the API
that schedules messages and campaigns (api.py), as a WSGI app served beside /metrics. Werkzeug
parses the requests and routes them.

Every response but the log-in form and its style sheet needs the secret: a session cookie that
the log-in sets, or `Authorization: Bearer <DASHBOARD_TOKEN>` for scripts. Actions are POSTs,
and with the cookie they also need the page's CSRF token in a header and a same-origin
`Origin`. The page renders every value from the database as text, under a Content-Security-
Policy that allows no inline script.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from loguru import logger
from pymongo.errors import PyMongoError
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
    TooManyRequests,
)
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from poller import status, web
from poller.dashboard.api import Api
from poller.dashboard.auth import Auth
from poller.dashboard.openapi import SPEC
from poller.pacing import Pacing
from poller.store import Store

# The page asks for the picture this often; the database is asked at most once per interval,
# however many pages are open.
REFRESH_SECONDS = 5
# The activity (per-minute counts, lateness, pacing delay) scans the messages of its window:
# each window's is read at most this often.
ACTIVITY_SECONDS = 60
# The activity's windows (`?window=`): the last hour unless the page asks for the day.
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24)}
DEFAULT_WINDOW = "1h"
ACTIONS = {"pause": "paused", "resume": "running", "cancel": "cancelled"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": with it, a browser sends `Origin: null` on the log-in form's POST.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
PUBLIC = {"app.css"}  # the log-in form's style: no data


class Dashboard:
    """The dashboard's WSGI app, over the poller's own store."""

    def __init__(
        self, store: Store, pacing: Pacing, token: str, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.store, self.pacing = store, pacing
        self.clock = clock or (lambda: datetime.now(UTC))
        self.auth = Auth(token, self.clock)
        self.api = Api(store, pacing, self.clock)
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._activity: dict[str, tuple[float, dict[str, Any]]] = {}  # by window
        self.urls = Map(
            merge_slashes=False,  # `//api/status` is not found, not redirected
            rules=[
                Rule("/", endpoint="page", methods=["GET"]),
                Rule("/login", endpoint="login", methods=["POST"]),
                Rule("/logout", endpoint="logout", methods=["POST"]),
                Rule("/static/<name>", endpoint="static", methods=["GET"]),
                Rule("/favicon.ico", endpoint="icon", methods=["GET"]),
                Rule("/api/status", endpoint="api_status", methods=["GET"]),
                Rule("/api/openapi.json", endpoint="openapi", methods=["GET"]),
                Rule("/api/messages", endpoint="schedule", methods=["POST"]),
                Rule("/api/campaigns", endpoint="schedule", methods=["POST"]),
                Rule("/api/messages/<message>", endpoint="message", methods=["GET"]),
                Rule("/api/messages/<message>/cancel", endpoint="cancel", methods=["POST"]),
                Rule(
                    "/api/campaigns/<campaign>/<any(pause, resume, cancel):action>",
                    endpoint="action",
                    methods=["POST"],
                ),
            ],
        )

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        request = Request(environ)
        # The server holds bodies to these limits too (poller.web); a check of its own here.
        large = request.path in web.LARGE_BODIES
        request.max_content_length = web.API_BODY_BYTES if large else web.BODY_BYTES
        try:
            endpoint, args = self.urls.bind_to_environ(environ).match()
            response = getattr(self, f"_{endpoint}")(request, **args)
        except (NotFound, MethodNotAllowed) as exc:
            response = _json({"error": exc.name}, exc.code or 404)
        except RequestEntityTooLarge:
            limit = request.max_content_length or 0
            size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 1024} KiB"
            response = _json({"error": f"the body is over {size}"}, 413)
        except TooManyRequests as exc:  # a wrong bearer token too often: not even compared
            response = _json({"error": "too many failed log-ins: try again later"}, 429)
            response.headers["Retry-After"] = str(exc.retry_after)
        except HTTPException as exc:
            response = _json({"error": exc.name}, exc.code or 400)
        except PyMongoError as exc:
            logger.warning("dashboard: MongoDB is unavailable: {}", exc)
            response = _json({"error": "MongoDB is unavailable"}, 503)
        except Exception:  # a bug: answered like any other error, and logged
            logger.exception("dashboard: {} {} failed", request.method, request.path[:200])
            response = _json({"error": "Internal Server Error"}, 500)
        response.headers.update(HEADERS)
        return response(environ, start_response)  # type: ignore[no-any-return]

    # -- pages ------------------------------------------------------------------------------------

    def _page(self, request: Request) -> Response:
        if self.auth.session(request) is None:
            return _html(_asset("login.html"), 200)
        return _html(_asset("index.html"), 200)

    def _login(self, request: Request) -> Response:
        if not self.auth.same_origin(request):
            return _json({"error": "cross-site log-in refused"}, 403)
        try:
            right = self.auth.log_in(request, request.form.get("token", ""))
        except TooManyRequests as exc:
            response = _html(_login_page("throttled"), 429)
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        if not right:
            return _html(_login_page("failed"), 401)
        response = Response(status=303, headers={"Location": "/"})
        self.auth.set_cookie(response, request)
        return response

    def _logout(self, request: Request) -> Response:
        if not self.auth.same_origin(request):
            return _json({"error": "cross-site log-out refused"}, 403)
        response = Response(status=303, headers={"Location": "/"})
        response.delete_cookie(Auth.COOKIE, path="/")
        return response

    def _icon(self, request: Request) -> Response:
        return Response(status=204)

    def _static(self, request: Request, name: str) -> Response:
        if name not in STATIC:
            raise NotFound()
        if name not in PUBLIC and self.auth.session(request) is None:
            return _json({"error": "log in first"}, 401)
        return Response(_asset(name), content_type=f"{STATIC[name]}; charset=utf-8")

    # -- the API ----------------------------------------------------------------------------------

    def _api_status(self, request: Request) -> Response:
        session = self.auth.session(request)
        if session is None:
            return _json({"error": "log in first"}, 401)
        window = request.args.get("window", DEFAULT_WINDOW)
        if window not in WINDOWS:
            return _json({"error": f"window is one of {', '.join(WINDOWS)}"}, 400)
        chat = request.args.get("chatId", "").strip()[:200] or None
        campaign = request.args.get("campaign", "").strip()[:200] or None
        picture = {**self._overview(window), "csrf": self.auth.csrf(session)}
        if chat or campaign:  # a filtered list, read for this request (the whole one is cached)
            picture["notSent"] = self._not_sent(chat, campaign)
        return Response(status.to_json(picture), content_type="application/json")

    def _action(self, request: Request, campaign: str, action: str) -> Response:
        refused = self._refused(request, acting=True)
        if refused is not None:
            return refused
        if not self.store.campaigns.control(campaign, ACTIONS[action], self.clock()):
            return _json({"error": "no such open campaign"}, 404)
        self._changed()
        logger.info("dashboard: campaign {!r} set to {}", campaign[:100], ACTIONS[action])
        return _json({"campaign": campaign, "status": ACTIONS[action]}, 200)

    def _openapi(self, request: Request) -> Response:
        refused = self._refused(request)
        return _json(SPEC, 200) if refused is None else refused

    def _schedule(self, request: Request) -> Response:
        return self._acting(request, lambda: self.api.post(request))

    def _message(self, request: Request, message: str) -> Response:
        refused = self._refused(request)
        return self.api.message(message) if refused is None else refused

    def _cancel(self, request: Request, message: str) -> Response:
        return self._acting(request, lambda: self.api.cancel(message))

    def _acting(self, request: Request, answer: Callable[[], Response]) -> Response:
        """An API POST that writes: refused unless it may act; the next picture shows what
        it changed."""
        refused = self._refused(request, acting=True)
        if refused is not None:
            return refused
        response = answer()
        if response.status_code < 300:
            self._changed()
        return response

    def _refused(self, request: Request, acting: bool = False) -> Response | None:
        """The answer to a request that may not do this (not logged in; for a POST, not this
        site's page with its CSRF token), or None."""
        session = self.auth.session(request)
        if session is None:
            return _json({"error": "log in first"}, 401)
        if acting and not self.auth.may_act(request, session):
            return _json({"error": "cross-site request refused"}, 403)
        return None

    def _changed(self) -> None:
        """Something was written: the next picture is read afresh."""
        with self._lock:
            self._cached = None

    def _overview(self, window: str) -> dict[str, Any]:
        """`poller status --json`'s picture, with the activity of the `window`; read from the
        database at most once per REFRESH_SECONDS (each window's activity once per
        ACTIVITY_SECONDS)."""
        with self._lock:
            now, ticks = self.clock(), time.monotonic()
            if self._cached is None or ticks - self._cached[0] >= REFRESH_SECONDS:
                picture = status.build(self.store, now, self.pacing)
                picture["now"] = now
                picture["notSent"] = self._not_sent()
                self._cached = (ticks, picture)
            cached = self._activity.get(window)
            if cached is None or ticks - cached[0] >= ACTIVITY_SECONDS:
                since, activity = now - WINDOWS[window], self.store.activity
                read = {
                    "window": window,
                    "activityAt": now,
                    "perMinute": activity.per_minute(since),
                    "lateness": activity.lateness(since),
                    "pacingDelay": activity.pacing_delay(since),
                }
                cached = self._activity[window] = (ticks, read)
            return {**self._cached[1], **cached[1]}

    def _not_sent(self, chat: str | None = None, campaign: str | None = None) -> list[Any]:
        """The latest messages not sent, with their campaigns' names."""
        return self.store.activity.not_sent(50, chat, campaign)


def _asset(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


def _login_page(shown: str) -> str:
    """The log-in form with its message `shown` ("failed", "throttled") visible."""
    return _asset("login.html").replace(f'id="{shown}" hidden', f'id="{shown}"')


def _html(text: str, code: int) -> Response:
    return Response(text, status=code, content_type="text/html; charset=utf-8")


def _json(body: dict[str, Any], code: int) -> Response:
    return Response(status.to_json(body), status=code, content_type="application/json")
