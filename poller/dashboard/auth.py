"""Who may see the dashboard: the holder of DASHBOARD_TOKEN.

The log-in form trades the token for a session cookie (HttpOnly, SameSite=Strict, Secure behind
TLS) that holds when it was issued and an HMAC of that under the token: nothing is stored, and
changing the token ends every session. Scripts send `Authorization: Bearer <token>` instead.
Every comparison is made in constant time, and a client that keeps sending wrong tokens is
refused for a while without its token being compared (throttle.py).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from werkzeug.exceptions import TooManyRequests
from werkzeug.wrappers import Request, Response

from poller.dashboard.throttle import Throttle

BEARER = "bearer"  # the session of a request that carries the token itself


class Auth:
    COOKIE = "poller_dashboard"
    LIFETIME = timedelta(hours=12)

    def __init__(self, token: str, clock: Callable[[], datetime]) -> None:
        self._key = token.encode()
        self._clock = clock  # when a cookie is issued, and when it has lived LIFETIME
        self._digest = hashlib.sha256(self._key).digest()
        self.throttle = Throttle()

    def matches(self, given: str) -> bool:
        """Whether `given` is the token: digests of equal length compared in constant time."""
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._digest)

    def log_in(self, request: Request, given: str) -> bool:
        """Whether `given`, sent by `request`'s client, is the token; a wrong one counts
        against the client. Raises TooManyRequests (429, with its Retry-After) without
        comparing when the client failed too often lately."""
        wait = self.throttle.retry_after(request.remote_addr)
        if wait is not None:
            raise TooManyRequests(retry_after=wait)
        if self.matches(given):
            return True
        self.throttle.failed(request.remote_addr)
        return False

    def session(self, request: Request) -> str | None:
        """The request's session when it is logged in (its cookie, or BEARER), else None.
        Raises TooManyRequests as `log_in` does for a bearer token."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return BEARER if self.log_in(request, header.removeprefix("Bearer ").strip()) else None
        value = request.cookies.get(self.COOKIE, "")
        issued, _, mac = value.partition(".")
        if not issued.isdigit() or not _same(mac, self._sign("session", issued)):
            return None
        if self._clock().timestamp() - int(issued) > self.LIFETIME.total_seconds():
            return None
        return value

    def set_cookie(self, response: Response, request: Request) -> None:
        issued = str(int(self._clock().timestamp()))
        response.set_cookie(
            self.COOKIE,
            f"{issued}.{self._sign('session', issued)}",
            max_age=int(self.LIFETIME.total_seconds()),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=_secure(request),
        )

    def csrf(self, session: str) -> str:
        """The token the page sends with each action, tied to its session."""
        return self._sign("csrf", session)

    def may_act(self, request: Request, session: str) -> bool:
        """Whether a POST may change something: with the token itself (no cookie, so no page
        of another site can send it), or from this site's own page with its CSRF token."""
        if session == BEARER:
            return True
        given = request.headers.get("X-CSRF-Token", "")
        return self.same_origin(request) and _same(given, self.csrf(session))

    def same_origin(self, request: Request) -> bool:
        """No `Origin` (not a browser), or one naming this host. The scheme is not compared:
        behind a proxy that adds TLS, the page is https and the request reaching us http."""
        origin = request.headers.get("Origin")
        return origin is None or urlsplit(origin).netloc == request.host

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of text a client sent (any characters) and ours."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _secure(request: Request) -> bool:
    """Served over TLS, directly or behind a proxy that says so."""
    return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"
