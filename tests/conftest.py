"""Fixtures: a real MongoDB wire-protocol server, a fresh database per test, the WAHA simulator.
Hooks: the slow tests marked, and each test's log lines scanned for secrets."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from support import API_KEY, NO_SPEC, SPEC, child_logs, leaked_lines, suite_secrets

from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import MongoDaemon, embedded_mongodb, mongo_daemon
from poller.testing.waha import Request, WahaSimulator
from poller.waha import WahaClient

ROOT = Path(__file__).resolve().parents[1]

# Slow tests in files that do not mark them themselves (`make test` leaves slow tests out).
SLOW = ("tests/test_bad_input.py::test_arbitrary_documents_never_stop_the_poller",)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # around pytest's own: after its short summary
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter,
) -> Generator[None, None, None]:
    """One line at the end of a run that skipped checks against WAHA's published spec (just
    above the counts): how many, and how to turn them on."""
    yield
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum(NO_SPEC in str(getattr(report, "longrepr", "")) for report in skipped)
    if count:
        terminalreporter.write_line(
            f"{count} checks against WAHA's published OpenAPI spec skipped (no spec at {SPEC}): "
            "set WAHA_OPENAPI to its path to run them. Every WAHA server serves it: curl -o "
            "openapi.json http://localhost:3000/-json (or waha.devlike.pro/swagger/openapi.json)"
        )


# -- every log line of every test, scanned for secrets -------------------------------------------
# A test fails when a WAHA key or MongoDB password of the suite shows in what it logged: its
# stdout, stderr and log records, and the stderr of every Python process it started, which
# capture/sitecustomize.py copies into a folder of the test's own (POLLER_TEST_LOGS).

SECRETS_IN_LOGS = suite_secrets()
LOGS = pytest.StashKey[Path]()
REPORTED = pytest.StashKey[set[str]]()
_logs_root = Path()
_numbers = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    global _logs_root
    _logs_root = Path(tempfile.mkdtemp(prefix="poller-test-logs-"))
    paths = [str(ROOT / "tests" / "capture"), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_logs_root, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test starts a process
def pytest_runtest_setup(item: pytest.Item) -> None:
    folder = _logs_root / str(next(_numbers))
    folder.mkdir()
    item.stash[LOGS] = folder
    os.environ["POLLER_TEST_LOGS"] = str(folder)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """After each phase (setup, call, teardown): the lines logged so far that show a secret and
    were not reported yet fail that phase (the test fails; at teardown, it errors)."""
    report = yield
    logged = {"stdout": report.capstdout, "stderr": report.capstderr, "log": report.caplog}
    folder = item.stash.get(LOGS, None)
    if folder is not None:
        logged["stderr of a process it started"] = child_logs(folder)
        if report.when == "teardown":
            shutil.rmtree(folder, ignore_errors=True)
    reported = item.stash.setdefault(REPORTED, set())
    leaked = [
        f"{where}: {masked(line)}"
        for where, text in logged.items()
        for line in leaked_lines(text, SECRETS_IN_LOGS)
    ]
    new = [line for line in dict.fromkeys(leaked) if line not in reported]
    reported.update(new)
    if new:
        text = f"{len(new)} log line(s) show a secret (masked here):\n" + "\n".join(new[:20])
        if report.passed:
            report.outcome = "failed"
            report.longrepr = text
        else:
            report.sections.append(("secrets in the logs", text))
    return report


def masked(line: str) -> str:
    for secret in sorted(SECRETS_IN_LOGS, key=len, reverse=True):
        line = line.replace(secret, "<secret>")
    return line


# -- MongoDB and WAHA ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """MONGODB_TEST_URI (a real mongod) when set, else SecantusDB started in this process."""
    if os.environ.get("MONGODB_TEST_URI"):
        yield os.environ["MONGODB_TEST_URI"]
        return
    with embedded_mongodb() as uri:
        yield uri


@pytest.fixture
def db_name(mongo_uri: str) -> Iterator[str]:
    name = f"poller_test_{uuid.uuid4().hex[:10]}"
    yield name
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    client.drop_database(name)
    client.close()


@pytest.fixture(scope="session")
def openapi_validator() -> Callable[[Request], str | None] | None:
    """Checks a request against WAHA's published OpenAPI spec, when the spec is beside the repo."""
    if not SPEC.exists():
        return None
    from urllib.parse import parse_qsl

    from openapi_core import Config, OpenAPI
    from openapi_core.testing import MockRequest

    # The published spec has schema slips of its own (`required: true`): check requests, not it.
    spec = OpenAPI.from_dict(json.loads(SPEC.read_text()), config=Config(spec_validator_cls=None))

    def validate(request: Request) -> str | None:
        mock = MockRequest(
            "http://localhost:3000",  # the spec's server; the simulator's port varies
            request.method.lower(),
            request.path,
            args=dict(parse_qsl(request.query)),
            headers=request.headers,
            data=request.body or None,
            content_type=request.headers.get("Content-Type", "application/json").split(";")[0],
        )
        try:
            spec.validate_request(mock)
        except Exception as exc:  # openapi-core raises one of many error types
            return f"{type(exc).__name__}: {exc}"
        return None

    return validate


@pytest.fixture
def waha(openapi_validator: Callable[[Request], str | None] | None) -> Iterator[WahaSimulator]:
    simulator = WahaSimulator(api_key=API_KEY, not_working_wait=0.2, validator=openapi_validator)
    with simulator:
        yield simulator
    assert simulator.violations == [], "requests that break WAHA's OpenAPI spec"


@pytest.fixture
def make_settings(mongo_uri: str, db_name: str, waha: WahaSimulator) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "mongodb_uri": mongo_uri,
            "mongodb_db": db_name,
            "waha_url": waha.url,
            "waha_api_key": API_KEY,
            # Generous: on a busy machine an answer is slow, not missing. A test of a timeout
            # sets a short one.
            "waha_timeout_seconds": 30.0,
            "mongodb_timeout_seconds": 30.0,
            "instance_id": f"test-{uuid.uuid4().hex[:6]}",
            # Unpaced unless a test is about pacing: most tests send several messages at once.
            "pacing_min_seconds": 0.0,
            "pacing_max_seconds": 0.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[WahaClient]:
    """A WAHA client for the simulator, as the poller makes one."""
    waha = WahaClient(settings.waha_url, settings.waha_api_key, settings.waha_timeout_seconds)
    yield waha
    waha.close()


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = Store.connect(settings)
    store.ensure_indexes()
    yield store
    store.close()


@pytest.fixture
def daemon() -> Iterator[MongoDaemon]:
    """SecantusDB as a process of its own: it can be killed, restarted and made to fail."""
    with mongo_daemon() as running:
        yield running


@pytest.fixture
def on_daemon(
    daemon: MongoDaemon, make_settings: Callable[..., Settings]
) -> Iterator[tuple[Settings, Store]]:
    """Settings for the daemon's database, and a store on it."""
    settings = make_settings(mongodb_uri=daemon.uri)
    store = Store.connect(settings)
    store.ensure_indexes()
    yield settings, store
    store.close()
