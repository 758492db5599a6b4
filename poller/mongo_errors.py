"""A MongoDB error in one line, for the person reading the log: which host(s), what failed and
how long the poller waited, instead of the driver's dump of its topology (which quotes its own
timeouts, not MONGODB_TIMEOUT_SECONDS)."""

from __future__ import annotations

import re

from pymongo.errors import (
    AutoReconnect,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

# What failed, read from the driver's text of one server's error: the first pattern that
# matches names it.
KINDS = (
    (r"connection refused", "connection refused"),
    (
        r"name or service not known|nodename nor servname|name resolution|getaddrinfo",
        "DNS: no such host",
    ),
    (r"certificate verify failed", "TLS: certificate not trusted"),
    (r"ssl|tls", "TLS handshake failed"),
    (r"no servers found yet|timed out|timeout", "no answer (timed out)"),
    (r"no route to host|network is unreachable", "no route to host"),
    (r"connection reset|connection closed|broken pipe|eof", "connection closed by the server"),
    (r"authentication failed", "authentication failed"),
    (r"got response id|protocolerror", "answered, but not as a MongoDB server"),
    (r"no primary available|no replica set members", "no primary (an election, or none reachable)"),
    (r"internal hostnames", "the replica set names its members by names not reachable from here"),
)
# The driver's note of its timeouts (connectTimeoutMS, socketTimeoutMS), repeated per server.
_CONFIGURED = re.compile(r" \(configured timeouts: [^)]*\)")
_SERVER = re.compile(r"<ServerDescription \('([^']*)', (\d+)\)")
# "host:port: text", how the driver words a network error of one server.
_HOST_ERROR = re.compile(r"(\[[^\]]+\]:\d+|[^\s:\[\]]+:\d+): (.*)", re.DOTALL)


def describe(exc: PyMongoError, timeout: float) -> str:
    """One line for `exc`; `timeout` is MONGODB_TIMEOUT_SECONDS, the time each operation had."""
    waited = f"waited {timeout:g} s"
    if isinstance(exc, ServerSelectionTimeoutError):
        summary, _, topology = _CONFIGURED.sub("", str(exc)).partition(", Timeout: ")
        hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in _SERVER.findall(topology)]
        by_kind: dict[str, list[str]] = {}
        for host, text in _per_host(summary, hosts).items():
            by_kind.setdefault(_kind(text), []).append(host)
        if not by_kind:
            return f"{_kind(summary)}; {waited}"
        parts = [f"{', '.join(_few(found))}: {kind}" for kind, found in by_kind.items()]
        return f"{'; '.join(parts)}; {waited}"
    if isinstance(exc, OperationFailure):
        return _refused(exc) + (f"; {waited}" if exc.timeout else "")
    text = _CONFIGURED.sub("", str(exc))
    found = _HOST_ERROR.fullmatch(text) if isinstance(exc, AutoReconnect) else None
    if found:
        text = f"{found.group(1)}: {_kind(found.group(2))}"
    return _short(text) + (f"; {waited}" if exc.timeout else "")


def _per_host(summary: str, hosts: list[str]) -> dict[str, str]:
    """Each server's error in the driver's summary (their texts joined with commas, each with
    its "host:port: "); a server the summary does not name gets all of it ("No servers found
    yet", "No primary available for writes")."""
    marks = sorted((summary.find(f"{host}: "), host) for host in hosts if f"{host}: " in summary)
    texts = {host: summary for host in hosts}
    for k, (at, host) in enumerate(marks):
        start = summary.rfind(",", 0, at) + 1 if k else 0
        end = summary.rfind(",", 0, marks[k + 1][0]) if k + 1 < len(marks) else len(summary)
        texts[host] = summary[start:end].replace(f"{host}: ", "")
    return texts


def _kind(text: str) -> str:
    lowered = text.lower()
    for pattern, kind in KINDS:
        if re.search(pattern, lowered):
            return kind
    return _short(re.sub(r"\[Errno -?\d+\] ", "", text), 80)


def _refused(exc: OperationFailure) -> str:
    """A command MongoDB answered with an error: its code name and message, without the full
    reply the driver appends."""
    details = exc.details if isinstance(exc.details, dict) else {}
    message = str(details.get("errmsg") or str(exc).split(", full error:")[0])
    if exc.code == 18:  # AuthenticationFailed
        return "authentication failed: check the user, the password and authSource in MONGODB_URI"
    name = details.get("codeName") or f"code {exc.code}"
    return _short(f"MongoDB refused the command ({name}): {message}")


def _few(hosts: list[str]) -> list[str]:
    return hosts if len(hosts) <= 4 else [*hosts[:3], f"{len(hosts) - 3} more"]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
