"""A new user's first hour: the mistakes anyone makes while setting `poller` up, each answered
with one line that names the cause and the fix.

A WAHA_URL ending in /api (every URL in WAHA's docs has it) is named as such, not taken for a
session that is not started; an unreachable MongoDB is one line (its host, what failed, how long
the poller waited), not the driver's topology dump; a misspelt variable is warned about with the
nearest name; log lines about a pause say it lasts from now on; `make help`, the demo's install
hint and the count of checks skipped for want of WAHA's spec.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError
from support import API_KEY, POLLER, environment, message, seconds, utcnow

from poller import daemon
from poller.breaker import Breakers
from poller.mongo_errors import describe
from poller.servers import Servers, route
from poller.settings import ConfigError, Settings, variables
from poller.store import Store
from poller.testing import mongo
from poller.testing.mongo import free_port
from poller.testing.waha import WahaSimulator
from poller.waha import Outcome, Verdict, WahaClient, classify

ROOT = Path(__file__).resolve().parents[1]


def poller(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        POLLER + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def messages_of(stderr: str) -> list[str]:
    """The messages of the log lines (without time and level)."""
    return [line.split(" | ", 2)[-1] for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def unchecked() -> Iterator[WahaSimulator]:
    """A WAHA simulator whose requests are not held against the spec: these tests send some to
    paths WAHA has no route for, on purpose."""
    with WahaSimulator(api_key=API_KEY) as simulator:
        yield simulator


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """What this process logs, message by message."""
    found: list[str] = []
    sink = logger.add(found.append, format="{message}")
    yield found
    logger.remove(sink)


# -- 1. a WAHA_URL ending in /api ----------------------------------------------------------------


def test_once_names_a_waha_url_ending_in_api_and_exits_1(
    settings: Settings, store: Store, unchecked: WahaSimulator, tmp_path: Path
) -> None:
    """WAHA answers /api/api/sessions with Express's own 404: that is the URL, not a session."""
    store.messages.collection.insert_one(message(utcnow()))
    env = environment(settings, WAHA_URL=f"{unchecked.url}/api")
    result = poller(["once"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    said = messages_of(result.stderr)
    fix = f"WAHA_URL should be the server's root, without /api ({unchecked.url})"
    assert any("Cannot GET /api/api/sessions" in line and fix in line for line in said), said
    assert not any("not started" in line for line in said), said
    assert unchecked.sent == []
    doc = store.messages.collection.find_one({})
    assert doc is not None and doc.get("status") not in ("failed", "unknown")
    assert "not started" not in (doc.get("lastError") or "")


def test_every_request_to_a_doubled_api_path_names_the_url_variable(
    unchecked: WahaSimulator,
) -> None:
    client = WahaClient(f"{unchecked.url}/api", API_KEY, 30, url_variable="WAHA_EU1_URL")
    try:
        fix = f"WAHA_EU1_URL should be the server's root, without /api ({unchecked.url})"
        sent = client.send_text("default", "447700900123@c.us", "Hello")
        listed = client.sessions()
        asked = client.new_message_id("default")
    finally:
        client.close()
    for outcome, said in [
        (sent, "Cannot POST /api/api/sendText"),
        (listed, "Cannot GET /api/api/sessions"),
        (asked, "Cannot GET /api/api/default/new-message-id"),
    ]:
        assert isinstance(outcome, Outcome) and outcome.verdict is Verdict.REJECTED_KEY
        assert outcome.wrong_url and said in outcome.reason and fix in outcome.reason
    assert client.offers_ids, "a wrong URL says nothing of this WAHA's message ids"
    assert unchecked.sent == []


def test_a_server_that_has_no_waha_route_is_not_taken_for_waha(unchecked: WahaSimulator) -> None:
    """The web app on port 3000 answers its own Express 404 for /api/sessions."""
    unchecked.raw_answers["/api/sessions"] = (
        404,
        "application/json",
        '{"statusCode":404,"message":"Cannot GET /api/sessions?all=true","error":"Not Found"}',
    )
    client = WahaClient(unchecked.url, API_KEY, 30)
    try:
        listed = client.sessions()
    finally:
        client.close()
    assert isinstance(listed, Outcome) and listed.wrong_url
    assert "is WAHA_URL the WAHA server's URL" in listed.reason


def test_an_express_404_is_never_read_as_a_session_not_started() -> None:
    """Even where the path it quotes says nothing of the URL setting."""
    outcome = classify(404, {"statusCode": 404, "message": "Cannot POST /other"}, "default")
    assert outcome.verdict is Verdict.RETRY
    assert outcome.reason == "WAHA has no such route (404: Cannot POST /other)"


def test_a_send_answered_cannot_post_pauses_the_server_not_the_session(
    make_settings: Callable[..., Settings], store: Store, waha: WahaSimulator
) -> None:
    """The sessions are listed, but sendText reaches WAHA under a prefix (a proxy that passes
    /waha through): the message waits untouched and `once` exits 1, as for a refused key."""
    waha.raw_answers["/api/sendText"] = (
        404,
        "application/json",
        json.dumps({"statusCode": 404, "message": "Cannot POST /waha/api/sendText"}),
    )
    store.messages.collection.insert_one(message(utcnow()))
    assert daemon.once(make_settings()) == 1
    doc = store.messages.collection.find_one({})
    assert doc is not None and doc.get("status") not in ("failed", "unknown")
    assert "not started" not in (doc.get("lastError") or "")
    assert waha.sent == []


def test_of_two_servers_the_one_with_a_wrong_url_is_paused_alone(
    unchecked: WahaSimulator, lines: list[str]
) -> None:
    servers = Servers(
        {
            "a": WahaClient(unchecked.url, API_KEY, 30, url_variable="WAHA_A_URL"),
            "b": WahaClient(f"{unchecked.url}/api", API_KEY, 30, url_variable="WAHA_B_URL"),
        }
    )
    try:
        routes = route(servers, Breakers(seconds(30)), utcnow())
    finally:
        servers.close()
    assert routes.server_of("default") == "a"
    assert servers.wrong_url == {"b"} and not servers.refused()
    state = servers.states["b"]
    assert state["keyAccepted"] is None, "the key was never the problem"
    assert "WAHA_B_URL should be the server's root, without /api" in state["problem"]
    # 4. the pause is said as what happens from now on
    [paused] = [line for line in lines if "WAHA server 'b'" in line]
    assert paused.startswith("pausing sends through WAHA server 'b' for the next 30 s: "), paused


def test_a_waha_url_ending_in_api_is_warned_about_at_start_up() -> None:
    env = {"MONGODB_URI": "mongodb://h/db", "WAHA_URL": "http://waha:3000/api/"}
    settings = Settings.from_env(env)
    assert settings.waha_url == "http://waha:3000/api", "a warning, not an error"
    [warning] = settings.warnings
    assert warning.startswith("WAHA_URL ends in /api") and "(http://waha:3000)" in warning
    several = Settings.from_env(
        {"MONGODB_URI": "mongodb://h/db", "WAHA_SERVERS": "eu1", "WAHA_EU1_URL": "http://w/api"}
    )
    assert [w.split(" ")[0] for w in several.warnings] == ["WAHA_EU1_URL"]
    assert several.servers[0].url_variable == "WAHA_EU1_URL"


# -- 2. an unreachable MongoDB, in one line ------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "before"),
    [
        ("once", "MongoDB is unavailable: "),
        ("run", "crashed: MongoDB is unavailable at start-up: "),
    ],
)
def test_an_unreachable_mongodb_is_one_short_line(
    settings: Settings, tmp_path: Path, command: str, before: str
) -> None:
    port = free_port()
    env = environment(
        settings, MONGODB_URI=f"mongodb://127.0.0.1:{port}/poller", MONGODB_TIMEOUT_SECONDS="2"
    )
    result = poller([command], env, tmp_path)
    assert result.returncode == 1
    [line] = [m for m in messages_of(result.stderr) if "MongoDB" in m]
    assert line == f"{before}127.0.0.1:{port}: connection refused; waited 2 s"
    assert len(line) < 200


def test_the_driver_waits_as_long_as_mongodb_timeout_seconds(
    make_settings: Callable[..., Settings],
) -> None:
    """Its own connect timeout (20 s by default) and server selection (30 s) too."""
    store = Store.connect(make_settings(mongodb_timeout_seconds=7))
    try:
        assert store.client.options.pool_options.connect_timeout == 7
        assert store.client.options.server_selection_timeout == 7
    finally:
        store.close()


def selection_error(summary: str, servers: list[tuple[str, int, str]]) -> Exception:
    """A ServerSelectionTimeoutError worded as pymongo 4 words it."""
    noted = " (configured timeouts: socketTimeoutMS: 20000.0ms, connectTimeoutMS: 20000.0ms)"
    described = ", ".join(
        f"<ServerDescription ('{host}', {port}) server_type: Unknown, rtt: None"
        + (f", error=AutoReconnect('{host}:{port}: {error}{noted}')" if error else "")
        + ">"
        for host, port, error in servers
    )
    return ServerSelectionTimeoutError(
        f"{summary}, Timeout: 9.99s, Topology Description: <TopologyDescription id: 6b1, "
        f"topology_type: Unknown, servers: [{described}]>"
    )


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            selection_error(
                "db1:27017: [Errno 111] Connection refused (configured timeouts: x),"
                "db2:27017: [Errno -2] Name or service not known (configured timeouts: x)",
                [
                    ("db1", 27017, "[Errno 111] Connection refused"),
                    ("db2", 27017, "[Errno -2] Name or service not known"),
                ],
            ),
            "db1:27017: connection refused; db2:27017: DNS: no such host; waited 10 s",
        ),
        (
            selection_error("No servers found yet", [("10.0.0.9", 27017, "")]),
            "10.0.0.9:27017: no answer (timed out); waited 10 s",
        ),
        (
            selection_error(
                "SSL handshake failed: db1:27017: [Errno 104] Connection reset by peer",
                [("db1", 27017, "[Errno 104] Connection reset by peer")],
            ),
            "db1:27017: TLS handshake failed; waited 10 s",
        ),
        (
            OperationFailure(
                "authentication failed, full error: {'ok': 0.0, 'code': 18}",
                18,
                {"ok": 0.0, "errmsg": "authentication failed", "codeName": "AuthenticationFailed"},
            ),
            "authentication failed: check the user, the password and authSource in MONGODB_URI",
        ),
    ],
)
def test_a_mongodb_error_says_where_what_and_how_long(exc: Any, line: str) -> None:
    assert describe(exc, 10) == line


# -- 3. a misspelt variable ----------------------------------------------------------------------

BASE = {"MONGODB_URI": "mongodb://h/db"}
SECRET = "value-no-log-may-show-1b2c"  # every variable below holds it: no warning may show it


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["PACING_MIN_SECOND"],
            [
                "PACING_MIN_SECOND is not a poller setting and is ignored; did you mean "
                "PACING_MIN_SECONDS?"
            ],
        ),
        (
            ["pacing_min_seconds"],
            [
                "pacing_min_seconds is not a poller setting and is ignored; names are "
                "case-sensitive: did you mean PACING_MIN_SECONDS?"
            ],
        ),
        (
            ["MESSAGE_COLLECTION"],
            [
                "MESSAGE_COLLECTION is not a poller setting and is ignored; "
                "did you mean MESSAGES_COLLECTION?"
            ],
        ),
        (["LOG_FORMAT"], ["LOG_FORMAT is not a poller setting and is ignored"]),
        (
            ["WAHA_APIKEY"],
            ["WAHA_APIKEY is not a poller setting and is ignored; did you mean WAHA_API_KEY?"],
        ),
        # WAHA's own variables, from a .env that serves WAHA too; a service link of Kubernetes.
        (
            [
                "WAHA_API_KEY_EXCLUDE_PATH",
                "WAHA_API_KEY_PLAIN",
                "WAHA_BASE_URL",
                "WAHA_DASHBOARD_PASSWORD",
                "MONGODB_SERVICE_HOST",
                "MONGODB_PORT_27017_TCP_ADDR",
                "HOME",
            ],
            [],
        ),
    ],
)
def test_an_unknown_variable_with_a_poller_prefix_is_warned_about(
    extra: list[str], expected: list[str]
) -> None:
    settings = Settings.from_env({**BASE, **dict.fromkeys(extra, SECRET)})
    assert list(settings.warnings) == expected
    assert not any(SECRET in warning for warning in settings.warnings)


def test_the_variables_of_named_servers_are_known() -> None:
    env = {
        **BASE,
        "WAHA_SERVERS": "eu1",
        "WAHA_EU1_URL": "http://w:3000",
        "WAHA_EU1_API_KEY": "k1",
        "WAHA_EU1_APIKEY": "k2",
    }
    assert Settings.from_env(env).warnings == (
        "WAHA_EU1_APIKEY is not a poller setting and is ignored; did you mean WAHA_EU1_API_KEY?",
    )


def test_the_known_names_are_those_readme_documents() -> None:
    """What Settings.from_env reads is the one list of known names; README's Configuration
    table lists the same (WAHA_<NAME>_* for each server of WAHA_SERVERS)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Configuration\n")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| `([A-Z_<>]+)`", table, re.MULTILINE))
    env = {**BASE, "WAHA_SERVERS": "eu1", "WAHA_EU1_URL": "http://w:3000"}
    read = {name.replace("WAHA_EU1_", "WAHA_<NAME>_") for name in variables(env)}
    assert read - documented == set(), "read but not in README's Configuration table"
    assert documented - read == set(), "in README's Configuration table but never read"


def test_optouts_collection_is_read() -> None:
    """README documents it; Settings.from_env did not read it."""
    assert Settings.from_env({**BASE, "OPTOUTS_COLLECTION": "stops"}).optouts_collection == "stops"


def test_a_missing_required_variable_names_a_near_one_that_is_set() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"MONGODB_URL": SECRET})
    assert str(raised.value) == (
        "MONGODB_URI is required but not set (MONGODB_URL is set: a misspelling?)"
    )


@pytest.mark.parametrize("command", ["check", "status"])
def test_the_commands_warn_at_start(settings: Settings, tmp_path: Path, command: str) -> None:
    result = poller([command], environment(settings, PACING_MIN_SECOND=SECRET), tmp_path)
    warning = (
        "WARNING | PACING_MIN_SECOND is not a poller setting and is ignored; did you mean "
        "PACING_MIN_SECONDS?"
    )
    assert warning in result.stderr
    assert SECRET not in result.stderr + result.stdout


# -- 5. small things -----------------------------------------------------------------------------


def test_make_lists_its_targets() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        ["make", "--no-print-directory"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    targets = [line.split()[1] for line in result.stdout.splitlines()]
    assert targets == ["help", "demo", "test", "bench"]
    for target in ("demo", "test"):  # README's "Try it" still works
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, timeout=60)
        assert dry.returncode == 0


def test_the_demo_says_how_to_install_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed = tmp_path / "site-packages"
    installed.mkdir()
    assert mongo.install_hint("demo", installed) == (
        f"{sys.executable} -m pip install 'poller[demo]'"
    )
    assert mongo.install_hint("demo", ROOT).startswith(f"run `make demo` in {ROOT} (or ")
    assert "-m pip install -e '.[demo]'` there)" in mongo.install_hint("demo", ROOT)
    monkeypatch.setitem(sys.modules, "secantus", None)  # not installed
    with pytest.raises(SystemExit) as raised, mongo.embedded_mongodb():
        pass
    assert str(raised.value) == (
        f"poller: the embedded MongoDB server is not installed: {mongo.install_hint('demo')}"
    )


@pytest.mark.timeout(300)
def test_the_run_ends_with_the_count_of_spec_checks_skipped(tmp_path: Path) -> None:
    missing = tmp_path / "openapi.json"
    env = {**os.environ, "WAHA_OPENAPI": str(missing)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_simulator.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    *_, line, counts = result.stdout.strip().splitlines()
    skipped = int(re.search(r"(\d+) skipped", counts).group(1))  # type: ignore[union-attr]
    assert skipped > 0
    assert line.startswith(
        f"{skipped} checks against WAHA's published OpenAPI spec skipped (no spec at {missing}): "
        "set WAHA_OPENAPI to its path to run them."
    )
    assert "/-json" in line
