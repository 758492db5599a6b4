"""Settings: one frozen record built from the environment and checked at start-up."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import time
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    mongodb_uri: str
    mongodb_db: str
    waha_url: str = "http://localhost:3000"
    # Sent as X-Api-Key; empty sends no header (WAHA Core builds that do not check it).
    waha_api_key: str = ""
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        uri = _required(env, "MONGODB_URI")
        try:
            parsed = _parse_uri(uri)
        except (InvalidURI, ConfigurationError, ValueError) as exc:
            # pymongo's message can quote the URI; name the variable only.
            raise ConfigError(
                f"MONGODB_URI is not a valid MongoDB URI ({_uri_problem(exc)})"
            ) from None
        db = env.get("MONGODB_DB", "").strip() or (parsed.get("database") or "")
        if not db:
            raise ConfigError("MONGODB_DB is not set and MONGODB_URI names no database")
        gaps = _pacing(env, cls.pacing_min_seconds, cls.pacing_max_seconds)
        settings = cls(
            mongodb_uri=uri,
            mongodb_db=db,
            waha_url=_http_url(env, "WAHA_URL", cls.waha_url),
            waha_api_key=_header_value(env, "WAHA_API_KEY"),
            poll_interval_seconds=_number(env, "POLL_INTERVAL_SECONDS", cls.poll_interval_seconds),
            lookback_seconds=_number(env, "LOOKBACK_SECONDS", cls.lookback_seconds),
            lease_seconds=_number(env, "LEASE_SECONDS", cls.lease_seconds),
            retry_seconds=_number(env, "RETRY_SECONDS", cls.retry_seconds),
            waha_timeout_seconds=_number(env, "WAHA_TIMEOUT_SECONDS", cls.waha_timeout_seconds),
            mongodb_timeout_seconds=_number(
                env, "MONGODB_TIMEOUT_SECONDS", cls.mongodb_timeout_seconds
            ),
            batch_size=int(_number(env, "BATCH_SIZE", cls.batch_size, whole=True)),
            messages_collection=_name(env, "MESSAGES_COLLECTION", cls.messages_collection),
            campaigns_collection=_name(env, "CAMPAIGNS_COLLECTION", cls.campaigns_collection),
            sessions_collection=_name(env, "SESSIONS_COLLECTION", cls.sessions_collection),
            heartbeats_collection=_name(env, "HEARTBEATS_COLLECTION", cls.heartbeats_collection),
            definitions_collection=_name(env, "DEFINITIONS_COLLECTION", cls.definitions_collection),
            heartbeat_seconds=_number(env, "HEARTBEAT_SECONDS", cls.heartbeat_seconds),
            instance_id=env.get("POLLER_INSTANCE_ID", "").strip() or default_instance_id(),
            health_port=_port(env, "HEALTH_PORT"),
            health_host=env.get("HEALTH_HOST", "").strip() or cls.health_host,
            log_json=_flag(env, "LOG_JSON"),
            log_level=_choice(
                env, "LOG_LEVEL", cls.log_level, {"DEBUG", "INFO", "WARNING", "ERROR"}
            ),
            pacing_collection=_name(env, "PACING_COLLECTION", cls.pacing_collection),
            pacing_min_seconds=gaps[0],
            pacing_max_seconds=gaps[1],
            typing=_flag(env, "TYPING"),
            typing_max_seconds=_number(env, "TYPING_MAX_SECONDS", cls.typing_max_seconds),
            daily_cap=_cap(env, "DAILY_CAP"),
            timezone=_timezone(env, "TIMEZONE", cls.timezone),
            quiet_hours=_quiet_hours(env, "QUIET_HOURS"),
        )
        return replace(settings, **_events(env))

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def secrets(self) -> list[str]:
        """Values that must never be written to a log line."""
        found = [self.waha_api_key, self.webhook_hmac_key, self.webhook_secret]
        try:
            password = _parse_uri(self.mongodb_uri).get("password") or ""
            found += [password, quote(password, safe=""), quote_plus(password)]
        except (InvalidURI, ConfigurationError, ValueError):
            pass
        return sorted({s for s in found if s})


def default_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _parse_uri(uri: str) -> dict[str, Any]:
    """Check a URI's syntax without network: a mongodb+srv:// host is resolved only on connect."""
    srv = "mongodb+srv://"
    return parse_uri("mongodb://" + uri[len(srv) :] if uri.startswith(srv) else uri)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is required but not set")
    return value


def _number(env: Mapping[str, str], name: str, default: float, whole: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {kind} greater than 0, got {raw!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}")
    return value


def _pacing(env: Mapping[str, str], low: float, high: float) -> tuple[float, float]:
    values = {}
    for name, default in (("PACING_MIN_SECONDS", low), ("PACING_MAX_SECONDS", high)):
        raw = env.get(name, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not 0 <= value < float("inf"):
            raise ConfigError(f"{name} must be 0 or more, got {raw!r}")
        values[name] = value
    low, high = values["PACING_MIN_SECONDS"], values["PACING_MAX_SECONDS"]
    if low > high:
        raise ConfigError(
            f"PACING_MIN_SECONDS ({low:g}) must not be greater than PACING_MAX_SECONDS ({high:g})"
        )
    return low, high


def _cap(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(
            f"{name} must be a whole number of 1 or more (unset: no cap), got {raw!r}"
        )
    return int(raw)


def _timezone(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{name} must be an IANA time zone such as Europe/Rome or UTC, got {raw!r}"
        ) from None
    return raw


def _quiet_hours(env: Mapping[str, str], name: str) -> tuple[time, time] | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    found = re.fullmatch(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", raw)
    hours = [int(g) for g in found.groups()] if found else []
    if not found or hours[0] > 23 or hours[2] > 23 or hours[1] > 59 or hours[3] > 59:
        raise ConfigError(f"{name} must be HH:MM-HH:MM such as 22:00-08:00, got {raw!r}")
    start, end = time(hours[0], hours[1]), time(hours[2], hours[3])
    if start == end:
        raise ConfigError(f"{name} starts and ends at the same time, got {raw!r}")
    return start, end


def _port(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"{name} must be a port number from 1 to 65535, got {raw!r}")
    return int(raw)


def _header_value(env: Mapping[str, str], name: str) -> str:
    """A value sent as an HTTP header: printable ASCII only. The error names the position of
    the first other character, never the value, which is a secret."""
    raw = env.get(name, "")
    value = raw.strip()
    for offset, char in enumerate(value):
        if not (char.isascii() and char.isprintable()):
            position = raw.index(value) + offset + 1
            raise ConfigError(
                f"{name} has a character an HTTP header cannot carry at position {position} "
                f"(U+{ord(char):04X}); retype it with plain ASCII letters, digits and symbols"
            )
    return value


def _http_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(
            f"{name} must be a plain base URL, without credentials or a query "
            "(the key goes in WAHA_API_KEY)"
        )
    return raw.rstrip("/")


def _name(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if "$" in raw or "\0" in raw or raw.startswith("system."):
        raise ConfigError(f"{name} is not a valid collection name: {raw!r}")
    return raw


def _events(env: Mapping[str, str]) -> dict[str, Any]:
    """WAHA's events: EVENTS=webhook needs HEALTH_PORT, and WEBHOOK_HMAC_KEY or
    WEBHOOK_SECRET (a webhook endpoint never takes unauthenticated posts)."""
    events = env.get("EVENTS", "").strip().lower()
    if events not in ("", "webhook"):
        raise ConfigError(f"EVENTS must be empty or 'webhook', not {events!r}")
    key = _header_value(env, "WEBHOOK_HMAC_KEY")
    secret = _header_value(env, "WEBHOOK_SECRET")
    if events and not (key or secret):
        raise ConfigError(
            "EVENTS=webhook needs WEBHOOK_HMAC_KEY (the webhook's hmac.key in WAHA) or "
            "WEBHOOK_SECRET (sent by WAHA as the X-Poller-Secret custom header): without "
            "either, anyone could post events"
        )
    if events and _port(env, "HEALTH_PORT") is None:
        raise ConfigError("EVENTS=webhook needs HEALTH_PORT: the webhook is served there")
    words = {
        name: tuple(" ".join(w.split()).upper() for w in env[name].split(",") if w.strip())
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
        found["webhook_max_bytes"] = int(_number(env, "WEBHOOK_MAX_BYTES", 0, whole=True))
    return found


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: set[str]) -> str:
    raw = env.get(name, "").strip().upper() or default
    if raw not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(sorted(allowed))}, got {raw!r}")
    return raw


def _uri_problem(exc: Exception) -> str:
    text = str(exc)
    # Keep pymongo's explanation but never the URI itself, which may hold a password.
    return text.split(":")[0] if "mongodb" in text else text
