"""Several WAHA servers, and which of them holds each WhatsApp session.

Each tick asks every server for its sessions, the servers side by side, each behind its own
breaker: a server that is down, slow or refusing its key pauses its own sessions only. A message
goes to the server where its session is WORKING. A session WORKING on two servers waits, since
sending through both could deliver a message twice; a session found on no server waits too.
Pacing, the daily count and the order of a session's messages do not depend on the server, so
they carry over when a session moves.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from loguru import logger

from poller.breaker import Breakers
from poller.settings import DEFAULT_SERVER, Settings
from poller.waha import Outcome, Verdict, WahaClient

# Of several servers, how long a tick waits for their session lists: a server that has not
# answered by then waits this tick out (a failure towards its breaker).
LISTING_WAIT_SECONDS = 10.0


def server_key(name: str) -> str:
    """The breaker key of a whole WAHA server (the other keys are session names, which do not
    start with a NUL)."""
    return f"\0server:{name}"


class Servers:
    """The WAHA client of each server, by name, and what is known of each across ticks."""

    def __init__(self, clients: dict[str, WahaClient]) -> None:
        if not clients:
            raise ValueError("at least one WAHA server is needed")
        self.clients = clients
        # Where each session was last WORKING (on one server only), to route it through a
        # passing hiccup of that server's listing, and to say where it was when it is not.
        self.last_seen: dict[str, str] = {}
        # Each server as the heartbeat shows it (see `_state`), as of its last listing.
        self.states: dict[str, dict[str, Any]] = {
            name: _state(name, c) for name, c in clients.items()
        }
        # The servers whose last answer said that no WAHA route serves their URL (`wrong_url`).
        self.wrong_url: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Servers:
        timeout = settings.waha_timeout_seconds
        return cls(
            {
                s.name: WahaClient(s.url, s.api_key, timeout, s.key_variable, s.url_variable)
                for s in settings.servers
            }
        )

    @classmethod
    def one(cls, client: WahaClient) -> Servers:
        return cls({DEFAULT_SERVER: client})

    @property
    def sole(self) -> str | None:
        """The name of the only server, when there is one only."""
        return next(iter(self.clients)) if len(self.clients) == 1 else None

    def refused(self) -> bool:
        """Every server refused this poller's settings for it at its last answer: its API key,
        or a URL under which WAHA serves none of its routes (`poller once` then exits 1)."""
        return all(
            state["keyAccepted"] is False or name in self.wrong_url
            for name, state in self.states.items()
        )

    def phone_of(self, session: str, lid: str) -> str | None:
        """The phone number of an `@lid` chat, asked of the server where `session` was last
        seen (of each in turn when that is not known); None when none knows it."""
        where = self.last_seen.get(session) or self.sole
        clients = [self.clients[where]] if where in self.clients else list(self.clients.values())
        return next((p for c in clients if (p := c.phone_of(session, lid)) is not None), None)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@dataclass(frozen=True)
class Routes:
    """Which server each session sends through in this tick, and why the others wait."""

    # Session -> the one server where it is WORKING.
    where: dict[str, str] = field(default_factory=dict)
    # Session -> why it cannot send now: listed but not WORKING, or WORKING on two servers.
    waits: dict[str, str] = field(default_factory=dict)
    # Server -> why its sessions are not known in this tick; with `hiccup`, a passing failure
    # (its breaker is still closed): the sessions last seen there still go to it.
    unknown: dict[str, str] = field(default_factory=dict)
    hiccup: frozenset[str] = frozenset()
    # Server -> the sessions it listed, by name (for the reasons).
    listed: dict[str, list[str]] = field(default_factory=dict)
    last_seen: dict[str, str] = field(default_factory=dict)
    sole: str | None = None

    def server_of(self, session: str) -> str | None:
        """The server to send this session's messages through now, or None."""
        if session in self.where:
            return self.where[session]
        if session in self.waits:
            return None
        if self.sole is not None:  # one server only: as before there were several
            return self.sole if self.sole in self.hiccup else None
        seen = self.last_seen.get(session)
        return seen if seen in self.hiccup else None

    def why_not(self, session: str) -> str | None:
        """Why this session cannot send now, as far as the servers' listings tell; None when
        it can."""
        if self.server_of(session) is not None:
            return None
        if session in self.waits:
            return self.waits[session]
        if self.sole is not None:
            if self.sole in self.unknown:
                return self.unknown[self.sole]
            listed = ", ".join(sorted(self.listed.get(self.sole, []))) or "none"
            return (
                f"Waiting: WAHA has no WhatsApp session '{session}' (its sessions: {listed}). "
                "Create or rename the session on WAHA, or fix the message's session."
            )
        seen = self.last_seen.get(session)
        if seen in self.unknown:
            return (
                f"Waiting: WhatsApp session '{session}' was last seen on WAHA server '{seen}', "
                f"which is not answering: {self.unknown[seen]}"
            )
        where = "; ".join(
            f"{name}: {', '.join(sorted(self.listed[name])) or 'none'}"
            if name in self.listed
            else f"{name}: not known ({self.unknown.get(name, 'not asked')})"
            for name in sorted({*self.listed, *self.unknown})
        )
        return (
            f"Waiting: no WAHA server has WhatsApp session '{session}' ({where}). Create or "
            "move the session to one of them, or fix the message's session."
        )


def route(servers: Servers, breakers: Breakers, now: datetime) -> Routes:
    """Ask every server whose breaker is closed for its sessions (side by side), feed the
    breakers, and route each session."""
    names = list(servers.clients)
    broken = breakers.open(now)
    asked = [name for name in names if server_key(name) not in broken]
    answers = _listings(servers, asked)
    unknown = {name: broken[server_key(name)] for name in names if name not in asked}
    for name in unknown:  # not asked: what was listed before may have changed since
        servers.states[name].update(sessions=None, problem=unknown[name])
    hiccup = set()
    listed: dict[str, list[dict[str, str]]] = {}
    for name, answer in answers.items():
        if isinstance(answer, Outcome):
            unknown[name] = answer.reason
            if answer.wrong_url:
                servers.wrong_url.add(name)
            if not _failed(servers, breakers, name, answer, now):
                hiccup.add(name)
            servers.states[name].update(_failure(answer))
        else:
            breakers.succeeded(server_key(name))
            servers.wrong_url.discard(name)
            listed[name] = answer
            servers.states[name].update(
                reachable=True, keyAccepted=True, problem=None, sessions=answer
            )
    open_now = breakers.open(now)
    for name in names:
        servers.states[name]["breaker"] = "open" if server_key(name) in open_now else "closed"
    return _routes(servers, listed, unknown, frozenset(hiccup))


def _listings(servers: Servers, asked: list[str]) -> dict[str, list[dict[str, str]] | Outcome]:
    """Each asked server's sessions. Of several, one that has not answered within
    LISTING_WAIT_SECONDS counts as a failed listing for this tick, so that a slow server does
    not hold up the others' sends (its request ends in the background, within its timeout)."""
    if len(asked) == 1:
        return {asked[0]: servers.clients[asked[0]].sessions()}
    pool = ThreadPoolExecutor(max(1, len(asked)))
    futures = {name: pool.submit(servers.clients[name].sessions) for name in asked}
    wait(futures.values(), timeout=LISTING_WAIT_SECONDS)
    pool.shutdown(wait=False)
    late = Outcome(
        Verdict.RETRY, f"WAHA did not list its sessions within {LISTING_WAIT_SECONDS:g} s"
    )
    return {name: f.result() if f.done() else late for name, f in futures.items()}


def _routes(
    servers: Servers,
    listed: dict[str, list[dict[str, str]]],
    unknown: dict[str, str],
    hiccup: frozenset[str],
) -> Routes:
    working: dict[str, list[str]] = {}
    statuses: dict[str, dict[str, str]] = {}
    for name, sessions in listed.items():
        for one in sessions:
            statuses.setdefault(one["name"], {})[name] = one["status"]
            if one["status"] == "WORKING":
                working.setdefault(one["name"], []).append(name)
    where: dict[str, str] = {}
    waits: dict[str, str] = {}
    for session, found in statuses.items():
        on = working.get(session, [])
        if len(on) == 1:
            where[session] = servers.last_seen[session] = on[0]
        elif len(on) > 1:
            waits[session] = (
                f"Waiting: WhatsApp session '{session}' is WORKING on two WAHA servers, "
                f"{' and '.join(sorted(on)[:2])}: sending through both could deliver a message "
                "twice. Stop it on one of them."
            )
        else:
            status = ", ".join(f"{found[name]} on {name}" for name in sorted(found))
            if servers.sole is not None:
                status = found[servers.sole]
            waits[session] = f"WhatsApp session '{session}' is {status}, not WORKING"
    return Routes(
        where,
        waits,
        unknown,
        hiccup,
        {name: [s["name"] for s in sessions] for name, sessions in listed.items()},
        dict(servers.last_seen),
        servers.sole,
    )


def _failed(
    servers: Servers, breakers: Breakers, name: str, answer: Outcome, now: datetime
) -> bool:
    """Count a failed listing towards the server's breaker; True when the breaker is open."""
    rejected = answer.verdict is Verdict.REJECTED_KEY
    reason, what = answer.reason, named(servers, name)
    if not breakers.failed(server_key(name), now, reason, rejected or answer.unreachable):
        logger.warning("{}; sending without it", reason if servers.sole else f"{what}: {reason}")
        return False
    log = logger.error if rejected else logger.warning
    seconds = breakers.cooldown.total_seconds()
    log("pausing sends through {} for the next {:g} s: {}", what, seconds, reason)
    return True


def lost(servers: Servers, name: str, outcome: Outcome) -> None:
    """What a send's answer that opened the server's breaker says of the server."""
    state = servers.states[name]
    state.update(sessions=None, problem=outcome.reason)
    if outcome.wrong_url:
        servers.wrong_url.add(name)
        state.update(reachable=True)
    elif outcome.verdict is Verdict.REJECTED_KEY:
        state.update(reachable=True, keyAccepted=False)
    elif outcome.unreachable:
        state.update(reachable=False)


def named(servers: Servers, name: str) -> str:
    """A server as logs and reasons name it: "WAHA", or "WAHA server 'eu1'" of several."""
    return "WAHA" if servers.sole else f"WAHA server '{name}'"


def _failure(answer: Outcome) -> dict[str, Any]:
    rejected = answer.verdict is Verdict.REJECTED_KEY and not answer.wrong_url
    return {
        "reachable": not answer.unreachable and answer.status_code is not None,
        "keyAccepted": False if rejected else None,
        "problem": answer.reason,
        "sessions": None,
    }


def _state(name: str, client: WahaClient) -> dict[str, Any]:
    """A server as the heartbeat, `poller status` and `poller check` show it."""
    return {
        "name": name,
        "url": client.base_url,
        "reachable": None,  # None: not asked yet
        "keyAccepted": None,
        "breaker": "closed",
        "problem": None,
        "sessions": None,
    }
