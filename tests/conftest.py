"""Fixtures: a real MongoDB wire-protocol server, a fresh database per test, the WAHA simulator."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from support import API_KEY, SECRETS, SUITE_LOGS

from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import MongoDaemon, embedded_mongodb, mongo_daemon
from poller.testing.waha import Request, WahaSimulator

ROOT = Path(__file__).resolve().parents[1]
OPENAPI = Path(os.environ.get("WAHA_OPENAPI", ROOT.parent / "shared" / "waha" / "openapi.json"))
LOGS_CHECK = "test_log.py::test_no_secret_in_any_log_line_of_the_suite"


# -- every log line of the suite, for the secrets check -----------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    os.environ["POLLER_TEST_LOGS"] = str(SUITE_LOGS[0])
    paths = [str(ROOT / "tests" / "capture"), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SUITE_LOGS[0], ignore_errors=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    SUITE_LOGS[1].append(report.capstdout + report.capstderr + report.caplog)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The secrets check reads what every other test logged: it runs last."""
    items.sort(key=lambda item: item.nodeid.endswith(LOGS_CHECK))


@pytest.fixture(scope="session")
def secrets() -> list[str]:
    test_uri = os.environ.get("MONGODB_TEST_URI", "")
    password = Settings(mongodb_uri=test_uri, mongodb_db="x").secrets if test_uri else []
    return SECRETS + password


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
    if not OPENAPI.exists():
        return None
    from urllib.parse import parse_qsl

    from openapi_core import Config, OpenAPI
    from openapi_core.testing import MockRequest

    # The published spec has schema slips of its own (`required: true`): check requests, not it.
    spec = OpenAPI.from_dict(
        json.loads(OPENAPI.read_text()), config=Config(spec_validator_cls=None)
    )

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
            "waha_timeout_seconds": 5.0,
            "mongodb_timeout_seconds": 5.0,
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
