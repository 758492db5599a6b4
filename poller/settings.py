"""Settings: one frozen record built from the environment and checked at start-up."""

from __future__ import annotations

import difflib
import os
import re
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import time
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit
from zoneinfo import ZoneInfo

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri

from poller import env as var
from poller.env import ConfigError
from poller.keywords import fold

__all__ = ["DEFAULT_SERVER", "ConfigError", "Settings", "WahaServer", "default_instance_id"]


# The name of the one WAHA server of WAHA_URL, when WAHA_SERVERS is not set.
DEFAULT_SERVER = "default"


@dataclass(frozen=True)
class WahaServer:
    """One WAHA server: a name for logs, metrics and lastError; its base URL; its API key."""

    name: str
    url: str
    api_key: str = ""
    key_variable: str = "WAHA_API_KEY"  # the setting that holds the key, to name when refused
    url_variable: str = "WAHA_URL"  # and the one that holds the URL


@dataclass(frozen=True)
class Settings:
    mongodb_uri: str
    mongodb_db: str
    waha_url: str = "http://localhost:3000"
    # Sent as X-Api-Key; empty sends no header (WAHA Core builds that do not check it).
    waha_api_key: str = ""
    # Several WAHA servers (WAHA_SERVERS); empty: the one of waha_url and waha_api_key.
    waha_servers: tuple[WahaServer, ...] = ()
    # The web app schedules to the minute; 30 s keeps lateness under a poll interval.
    poll_interval_seconds: float = 30.0
    # A message more than this late when first seen is expired, never sent late.
    lookback_seconds: float = 120.0
    # How long a claim stays valid without renewal; a dead poller's claims lapse after it.
    lease_seconds: float = 120.0
    # How long a message waits after a retryable failure (session not ready, WAHA down).
    retry_seconds: float = 30.0
    # Above WAHA's 5 s wait for a session to become WORKING, with room for slow engines.
    waha_timeout_seconds: float = 30.0
    # How long to wait for MongoDB before a command gives up (start-up, a tick).
    mongodb_timeout_seconds: float = 10.0
    # Messages claimed per round trip; small enough to send well inside one lease.
    batch_size: int = 20
    messages_collection: str = "scheduledmessages"
    campaigns_collection: str = "campaigns"
    sessions_collection: str = "whatsappsessions"
    heartbeats_collection: str = "pollerheartbeats"
    # Recurring schedules (cron rules) the web app writes.
    definitions_collection: str = "scheduledefinitions"
    # Chats that opted out of a session (from WAHA's events, or written by the web app).
    optouts_collection: str = "optouts"
    # WAHA's events as webhooks on the HEALTH_PORT server: off unless set ("webhook").
    events: str = ""
    # How a webhook post proves it comes from WAHA: its HMAC key, or a shared secret header.
    webhook_hmac_key: str = ""
    webhook_secret: str = ""
    webhook_max_bytes: int = 1_000_000
    # Whole inbound messages (case and spaces ignored) that opt a chat out, and back in.
    optout_keywords: tuple[str, ...] = ("STOP", "UNSUBSCRIBE")
    optin_keywords: tuple[str, ...] = ("START",)
    # Sent once to a chat that just opted out; empty: no reply.
    optout_reply: str = ""
    # The web dashboard on the HEALTH_PORT server: off unless this secret is set.
    dashboard_token: str = ""
    # One document per WhatsApp session: when it may send next, how many it sent today.
    pacing_collection: str = "pollerpacing"
    # How often `poller run` writes its heartbeat; three missed beats and it counts as down.
    heartbeat_seconds: float = 10.0
    instance_id: str = ""
    # Metrics are off unless a port is set: /metrics (Prometheus) and /healthz on it.
    health_port: int | None = None
    # Loopback by default; 0.0.0.0 to be scraped from another host or container.
    health_host: str = "127.0.0.1"
    log_json: bool = False
    log_level: str = "INFO"
    # A random gap between two messages of one session, as people leave: fixed or short gaps
    # look automated to WhatsApp. Both 0 turn pacing off.
    pacing_min_seconds: float = 10.0
    pacing_max_seconds: float = 25.0
    # Mark the chat seen and show "typing..." before each text, as WAHA advises.
    typing: bool = False
    # The longest "typing..." pause, however long the text.
    typing_max_seconds: float = 8.0
    # Messages per session per local day; None: no cap (a session's `dailyCap` overrides it).
    daily_cap: int | None = None
    # The zone of the daily cap's day and of the quiet hours.
    timezone: str = "UTC"
    # (start, end) local times between which nothing is sent; None: no quiet hours.
    quiet_hours: tuple[time, time] | None = None
    # What looks wrong in the environment without being an error (a misspelt name, a WAHA URL
    # ending in /api): logged as warnings at start-up. Never a value: it may be a secret.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of `env` (os.environ by default); raises ConfigError naming the first
        bad variable. Every name it looks up is a known setting (see `_unknown`)."""
        env = reads = _Reads(os.environ if env is None else env)
        uri = var.required(env, "MONGODB_URI")
        try:
            parsed = _parse_uri(uri)
        except (InvalidURI, ConfigurationError, ValueError) as exc:
            # pymongo's message can quote the URI; name the variable only.
            raise ConfigError(
                f"MONGODB_URI is not a valid MongoDB URI ({_uri_problem(exc)})"
            ) from None
        if any(mark in (parsed.get("password") or "") for mark in ("$(", "${")):
            raise ConfigError(
                "MONGODB_URI's password contains '$(' or '${': a .env file does not run "
                "commands or expand variables; paste the password itself, URL-encoded"
            )
        db = env.get("MONGODB_DB", "").strip() or (parsed.get("database") or "")
        if not db:
            raise ConfigError("MONGODB_DB is not set and MONGODB_URI names no database")
        gaps = var.pacing(env, cls.pacing_min_seconds, cls.pacing_max_seconds)
        settings = cls(
            mongodb_uri=uri,
            mongodb_db=db,
            waha_url=var.http_url(env, "WAHA_URL", cls.waha_url),
            waha_api_key=var.header_value(env, "WAHA_API_KEY"),
            waha_servers=_servers(env),
            poll_interval_seconds=var.number(
                env, "POLL_INTERVAL_SECONDS", cls.poll_interval_seconds
            ),
            lookback_seconds=var.number(env, "LOOKBACK_SECONDS", cls.lookback_seconds),
            lease_seconds=var.number(env, "LEASE_SECONDS", cls.lease_seconds),
            retry_seconds=var.number(env, "RETRY_SECONDS", cls.retry_seconds),
            waha_timeout_seconds=var.number(env, "WAHA_TIMEOUT_SECONDS", cls.waha_timeout_seconds),
            mongodb_timeout_seconds=var.number(
                env, "MONGODB_TIMEOUT_SECONDS", cls.mongodb_timeout_seconds
            ),
            batch_size=int(var.number(env, "BATCH_SIZE", cls.batch_size, whole=True)),
            messages_collection=var.name(env, "MESSAGES_COLLECTION", cls.messages_collection),
            campaigns_collection=var.name(env, "CAMPAIGNS_COLLECTION", cls.campaigns_collection),
            sessions_collection=var.name(env, "SESSIONS_COLLECTION", cls.sessions_collection),
            heartbeats_collection=var.name(env, "HEARTBEATS_COLLECTION", cls.heartbeats_collection),
            definitions_collection=var.name(
                env, "DEFINITIONS_COLLECTION", cls.definitions_collection
            ),
            optouts_collection=var.name(env, "OPTOUTS_COLLECTION", cls.optouts_collection),
            heartbeat_seconds=var.number(env, "HEARTBEAT_SECONDS", cls.heartbeat_seconds),
            instance_id=env.get("POLLER_INSTANCE_ID", "").strip() or default_instance_id(),
            health_port=var.port(env, "HEALTH_PORT"),
            health_host=env.get("HEALTH_HOST", "").strip() or cls.health_host,
            log_json=var.flag(env, "LOG_JSON"),
            log_level=var.choice(
                env, "LOG_LEVEL", cls.log_level, {"DEBUG", "INFO", "WARNING", "ERROR"}
            ),
            pacing_collection=var.name(env, "PACING_COLLECTION", cls.pacing_collection),
            pacing_min_seconds=gaps[0],
            pacing_max_seconds=gaps[1],
            typing=var.flag(env, "TYPING"),
            typing_max_seconds=var.number(env, "TYPING_MAX_SECONDS", cls.typing_max_seconds),
            daily_cap=var.cap(env, "DAILY_CAP"),
            timezone=var.timezone(env, "TIMEZONE", cls.timezone),
            quiet_hours=var.quiet_hours(env, "QUIET_HOURS"),
        )
        settings = replace(
            settings, **_events(env), dashboard_token=_dashboard(env, settings.health_port)
        )
        found = _unknown(reads.env, reads.names) + _api_suffix(settings.servers)
        return replace(settings, warnings=tuple(found))

    @property
    def servers(self) -> tuple[WahaServer, ...]:
        """The WAHA servers: those of WAHA_SERVERS, or the one of WAHA_URL."""
        return self.waha_servers or (WahaServer(DEFAULT_SERVER, self.waha_url, self.waha_api_key),)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def secrets(self) -> list[str]:
        """Values that must never be written to a log line."""
        found = [self.waha_api_key, self.webhook_hmac_key, self.webhook_secret]
        found.append(self.dashboard_token)
        found += [server.api_key for server in self.servers]
        try:
            password = _parse_uri(self.mongodb_uri).get("password") or ""
            found += [password, quote(password, safe=""), quote_plus(password)]
        except (InvalidURI, ConfigurationError, ValueError):
            pass
        return sorted({s for s in found if s})


def variables(env: Mapping[str, str]) -> frozenset[str]:
    """The names of the settings for `env`: every name `Settings.from_env` reads from it (so
    WAHA_<NAME>_URL and WAHA_<NAME>_API_KEY for each name WAHA_SERVERS gives)."""
    reads = _Reads(env)
    Settings.from_env(reads)
    return frozenset(reads.names)


# Variables with a poller prefix that the test suite and the benchmarks read, not the poller.
NOT_SETTINGS = (
    "MONGODB_TEST_URI",
    "POLLER_TEST_LOGS",
    "POLLER_MODEL_EXAMPLES",
    "WAHA_OPENAPI",
    "DASHBOARD_SCREENSHOT",
)

# Docker links and Kubernetes services name variables after a service (a service `mongodb`
# sets MONGODB_PORT, MONGODB_SERVICE_HOST, ...): not meant for the poller.
_SERVICE_LINK = re.compile(r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_[A-Z]+\w*)?)")


class _Reads(Mapping[str, str]):
    """An environment that notes every name looked up in it: what `Settings.from_env` reads
    is, by definition, the list of known settings."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        return self.env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def _unknown(env: Mapping[str, str], known: set[str]) -> list[str]:
    """A warning for each variable that looks meant for the poller but is no setting of it: it
    begins as a known setting does (its first word, `PACING_`, or the whole of a one-word name,
    `TYPING`) or ends in `_COLLECTION`, with the nearest known name. WAHA_* names are WAHA's own
    too (WAHA_API_KEY_EXCLUDE_PATH, ...; a .env may serve both): only a near miss of a poller
    name is reported there."""
    prefixes = tuple({name.split("_")[0] + ("_" if "_" in name else "") for name in known})
    found = []
    for name in sorted(env):
        upper = name.upper()
        meant = upper.startswith(prefixes) or upper.endswith("_COLLECTION")
        if name in known or upper in NOT_SETTINGS or not meant or _SERVICE_LINK.fullmatch(upper):
            continue
        waha = upper.startswith("WAHA_")
        if upper in known:
            hint = f"; names are case-sensitive: did you mean {upper}?"
        elif nearest := difflib.get_close_matches(upper, known, 1, 0.85 if waha else 0.6):
            hint = f"; did you mean {nearest[0]}?"
        elif waha:
            continue
        else:
            hint = ""
        found.append(f"{name} is not a poller setting and is ignored{hint}")
    return found


def _api_suffix(servers: tuple[WahaServer, ...]) -> list[str]:
    """A warning for each WAHA URL whose path ends in /api: the poller adds /api/... itself, so
    WAHA would see /api/api/... (unless a proxy serves WAHA under that path)."""
    return [
        f"{s.url_variable} ends in /api, but the poller adds /api/... itself: it should be the "
        f"WAHA server's root ({s.url.removesuffix('/api')}), unless a proxy serves WAHA there"
        for s in servers
        if urlsplit(s.url).path.rstrip("/").endswith("/api")
    ]


def default_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _parse_uri(uri: str) -> dict[str, Any]:
    """Check a URI's syntax without network: a mongodb+srv:// host is resolved only on connect."""
    srv = "mongodb+srv://"
    return parse_uri("mongodb://" + uri[len(srv) :] if uri.startswith(srv) else uri)


def _servers(env: Mapping[str, str]) -> tuple[WahaServer, ...]:
    """WAHA_SERVERS=eu1,eu2 names the servers; each has WAHA_<NAME>_URL and, unless all share
    WAHA_API_KEY, WAHA_<NAME>_API_KEY (the name upper-cased, `-` as `_`). Unset: ()."""
    raw = env.get("WAHA_SERVERS", "").strip()
    if not raw:
        return ()
    if env.get("WAHA_URL", "").strip():
        raise ConfigError(
            "WAHA_URL is set as well as WAHA_SERVERS: give each server's URL in "
            "WAHA_<NAME>_URL and unset WAHA_URL"
        )
    names = [part.strip() for part in raw.split(",")]
    if not all(re.fullmatch(r"[A-Za-z0-9]+([-_][A-Za-z0-9]+)*", name) for name in names):
        raise ConfigError(
            "WAHA_SERVERS must be names of letters, digits, - and _ separated by commas, "
            f"such as eu1,eu2; got {raw!r}"
        )
    servers: dict[str, WahaServer] = {}
    for name in names:
        prefix = f"WAHA_{name.upper().replace('-', '_')}_"
        if prefix in servers:
            raise ConfigError(
                f"WAHA_SERVERS names '{servers[prefix].name}' and '{name}', which share the "
                f"variables {prefix}*: rename one"
            )
        if not env.get(f"{prefix}URL", "").strip():
            raise ConfigError(f"{prefix}URL is not set: WAHA_SERVERS names the server '{name}'")
        own = var.header_value(env, f"{prefix}API_KEY")
        key, variable = (
            (own, f"{prefix}API_KEY")
            if own
            else (var.header_value(env, "WAHA_API_KEY"), "WAHA_API_KEY")
        )
        url = var.http_url(env, f"{prefix}URL", "")
        servers[prefix] = WahaServer(name, url, key, variable, f"{prefix}URL")
    urls = [server.url.lower() for server in servers.values()]
    for url in urls:
        if urls.count(url) > 1:
            twins = [s.name for s in servers.values() if s.url.lower() == url]
            raise ConfigError(
                f"WAHA servers {twins[0]} and {twins[1]} have the same URL {url}: each of "
                "its sessions would seem to be on two servers"
            )
    return tuple(servers.values())


def _events(env: Mapping[str, str]) -> dict[str, Any]:
    """WAHA's events: EVENTS=webhook needs HEALTH_PORT, and WEBHOOK_HMAC_KEY or
    WEBHOOK_SECRET (a webhook endpoint never takes unauthenticated posts)."""
    events = env.get("EVENTS", "").strip().lower()
    if events not in ("", "webhook"):
        raise ConfigError(f"EVENTS must be empty or 'webhook', not {events!r}")
    key = var.header_value(env, "WEBHOOK_HMAC_KEY")
    secret = var.header_value(env, "WEBHOOK_SECRET")
    if events and not (key or secret):
        raise ConfigError(
            "EVENTS=webhook needs WEBHOOK_HMAC_KEY (the webhook's hmac.key in WAHA) or "
            "WEBHOOK_SECRET (sent by WAHA as the X-Poller-Secret custom header): without "
            "either, anyone could post events"
        )
    if events and var.port(env, "HEALTH_PORT") is None:
        raise ConfigError("EVENTS=webhook needs HEALTH_PORT: the webhook is served there")
    words = {
        name: tuple(fold(w) for w in env[name].split(",") if fold(w))
        for name in ("OPTOUT_KEYWORDS", "OPTIN_KEYWORDS")
        if name in env
    }
    found: dict[str, Any] = {"events": events, "webhook_hmac_key": key, "webhook_secret": secret}
    if "OPTOUT_KEYWORDS" in words:
        found["optout_keywords"] = words["OPTOUT_KEYWORDS"]
    if "OPTIN_KEYWORDS" in words:
        found["optin_keywords"] = words["OPTIN_KEYWORDS"]
    if env.get("OPTOUT_REPLY", "").strip():
        found["optout_reply"] = env["OPTOUT_REPLY"].strip()
    if env.get("WEBHOOK_MAX_BYTES", "").strip():
        found["webhook_max_bytes"] = int(var.number(env, "WEBHOOK_MAX_BYTES", 0, whole=True))
    return found


def _dashboard(env: Mapping[str, str], health_port: int | None) -> str:
    """DASHBOARD_TOKEN turns the dashboard on; it needs HEALTH_PORT, and at least 16 characters
    (it is the one thing between the page and the database)."""
    token = var.header_value(env, "DASHBOARD_TOKEN")
    if not token:
        return ""
    if len(token) < 16:
        raise ConfigError(
            f"DASHBOARD_TOKEN must be at least 16 characters, got {len(token)}: generate one "
            "with `python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`"
        )
    if health_port is None:
        raise ConfigError("DASHBOARD_TOKEN needs HEALTH_PORT: the dashboard is served there")
    return token


def _uri_problem(exc: Exception) -> str:
    text = str(exc)
    # Keep pymongo's explanation but never the URI itself, which may hold a password.
    return text.split(":")[0] if "mongodb" in text else text
