"""Reading one setting from the environment: each reader checks its value and raises ConfigError
with a message that names the variable (and never a secret's value)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from datetime import time
from urllib.parse import urlsplit

from poller import cron


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        # A near name that is set, as a likely misspelling (the name only, never its value).
        near = difflib.get_close_matches(name, [k for k in env if k != name], 1, 0.85)
        hint = f" ({near[0]} is set: a misspelling?)" if near else ""
        raise ConfigError(f"{name} is required but not set{hint}")
    return value


def number(env: Mapping[str, str], name: str, default: float, whole: bool = False) -> float:
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


def pacing(env: Mapping[str, str], low: float, high: float) -> tuple[float, float]:
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


def cap(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(
            f"{name} must be a whole number of 1 or more (unset: no cap), got {raw!r}"
        )
    return int(raw)


def timezone(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if isinstance(cron.zone(raw), str):
        raise ConfigError(
            f"{name} must be an IANA time zone such as Europe/Rome or UTC, got {raw!r}"
        )
    return raw


def quiet_hours(env: Mapping[str, str], name: str) -> tuple[time, time] | None:
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


def port(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"{name} must be a port number from 1 to 65535, got {raw!r}")
    return int(raw)


# A shell's command substitution and expansion: left as they are in a .env file.
UNEXPANDED = ("$(", "${", "`")


def header_value(env: Mapping[str, str], name: str) -> str:
    """A secret sent as an HTTP header: printable ASCII only, and not a shell command that a
    .env file left unexpanded. The error names the position of the first other character,
    never the value."""
    raw = env.get(name, "")
    value = raw.strip()
    for mark in UNEXPANDED:
        if mark in value:
            raise ConfigError(
                f"{name} contains {mark!r}: a .env file does not run commands, so it is the "
                "command's text, not its output. Run the command in a shell and paste the "
                "value it prints"
            )
    for offset, char in enumerate(value):
        if not (char.isascii() and char.isprintable()):
            position = raw.index(value) + offset + 1
            raise ConfigError(
                f"{name} has a character an HTTP header cannot carry at position {position} "
                f"(U+{ord(char):04X}); retype it with plain ASCII letters, digits and symbols"
            )
    return value


def http_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = "a value with credentials or a query" if "@" in raw or "?" in raw else repr(raw)
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {shown}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(
            f"{name} must be a plain base URL, without credentials or a query "
            f"(the key goes in {name.removesuffix('URL')}API_KEY)"
        )
    return raw.rstrip("/")


def name(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if "$" in raw or "\0" in raw or raw.startswith("system."):
        raise ConfigError(f"{name} is not a valid collection name: {raw!r}")
    return raw


def flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def choice(env: Mapping[str, str], name: str, default: str, allowed: set[str]) -> str:
    raw = env.get(name, "").strip().upper() or default
    if raw not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(sorted(allowed))}, got {raw!r}")
    return raw
