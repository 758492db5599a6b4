"""The `poller` command as a user runs it: real processes, real signals, real exit codes.
Argument parsing and configuration errors, where no process boundary is under test, are
checked by calling `poller.cli.main` in this process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from support import (
    MONGODB_PASSWORD,
    POLLER,
    SECRETS,
    WRONG_KEY,
    environment,
    leaked_lines,
    message,
    seconds,
    utcnow,
    wait_until,
)

from poller import cli
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import Request, WahaSimulator


def sends(waha: WahaSimulator) -> list[Request]:
    """The sendText requests WAHA received (`poller run` also asks for session statuses)."""
    return [r for r in waha.requests if r.path == "/api/sendText"]


def poller(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        POLLER + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


SETTINGS = ("MONGODB", "WAHA", "LOG")  # the prefixes of the settings these tests set


@pytest.fixture
def bare_env() -> dict[str, str]:
    """An environment with no poller settings at all (run it from an empty folder: no .env)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS)}


Main = Callable[..., tuple[int, str, str]]


@pytest.fixture
def main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Main]:
    """`poller ARGS` in this process, from an empty folder, with no poller settings in the
    environment but `extra`: its exit code, stdout and stderr. The environment is put back
    afterwards (a .env that `main` reads adds to it)."""
    saved = dict(os.environ)
    for name in saved:
        if name.startswith(SETTINGS):
            del os.environ[name]
    monkeypatch.chdir(tmp_path)

    def run(args: list[str], **extra: str) -> tuple[int, str, str]:
        os.environ.update(extra)
        try:
            code = cli.main(args)
        except SystemExit as exc:  # argparse: --help, or a usage error
            code = exc.code if isinstance(exc.code, int) else 2
        out, err = capsys.readouterr()
        # What capsys read is not in the output the suite scans for secrets: scanned here.
        assert leaked_lines(out + err, SECRETS) == []
        return code, out, err

    yield run
    os.environ.clear()
    os.environ.update(saved)


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, "MONGODB_URI is required"),
        ({"MONGODB_URI": "postgres://localhost/x"}, "MONGODB_URI is not a valid MongoDB URI"),
        ({"MONGODB_URI": "mongodb://localhost:27017"}, "MONGODB_DB is not set"),
        ({"MONGODB_URI": "mongodb://h/db", "WAHA_URL": "ftp://waha"}, "WAHA_URL must be an http"),
        (
            {"MONGODB_URI": "mongodb://h/db", "POLL_INTERVAL_SECONDS": "soon"},
            "POLL_INTERVAL_SECONDS",
        ),
        ({"MONGODB_URI": "mongodb://h/db", "LOOKBACK_SECONDS": "-5"}, "LOOKBACK_SECONDS must be"),
        ({"MONGODB_URI": "mongodb://h/db", "BATCH_SIZE": "2.5"}, "BATCH_SIZE must be a whole"),
        ({"MONGODB_URI": "mongodb://h/db", "LOG_JSON": "maybe"}, "LOG_JSON must be 1 or 0"),
        # Several WAHA servers: each problem of the list named in the one line.
        ({"MONGODB_URI": "mongodb://h/db", "WAHA_SERVERS": "a,,b"}, "WAHA_SERVERS must be names"),
        ({"MONGODB_URI": "mongodb://h/db", "WAHA_SERVERS": "a b"}, "WAHA_SERVERS must be names"),
        ({"MONGODB_URI": "mongodb://h/db", "WAHA_SERVERS": "eu1"}, "WAHA_EU1_URL is not set"),
        (
            {"MONGODB_URI": "mongodb://h/db", "WAHA_SERVERS": "a", "WAHA_URL": "http://w:3000"},
            "WAHA_URL is set as well as WAHA_SERVERS",
        ),
        (
            {
                "MONGODB_URI": "mongodb://h/db",
                "WAHA_SERVERS": "eu-1,eu_1",
                "WAHA_EU_1_URL": "http://w",
            },
            "WAHA_SERVERS names 'eu-1' and 'eu_1', which share the variables WAHA_EU_1_*",
        ),
        (
            {
                "MONGODB_URI": "mongodb://h/db",
                "WAHA_SERVERS": "a,b",
                "WAHA_A_URL": "http://w:3000",
                "WAHA_B_URL": "http://w:3000/",
            },
            "WAHA servers a and b have the same URL http://w:3000",
        ),
        (
            {"MONGODB_URI": "mongodb://h/db", "DASHBOARD_TOKEN": "short", "HEALTH_PORT": "9108"},
            "DASHBOARD_TOKEN must be at least 16 characters, got 5",
        ),
        (
            {"MONGODB_URI": "mongodb://h/db", "DASHBOARD_TOKEN": "a-long-enough-token-123"},
            "DASHBOARD_TOKEN needs HEALTH_PORT",
        ),
        (
            {"MONGODB_URI": "mongodb://h/db", "WAHA_SERVERS": "a", "WAHA_A_URL": "http://k@w"},
            "WAHA_A_URL must be a plain base URL, without credentials or a query (the key goes "
            "in WAHA_A_API_KEY)",
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "once"])
def test_bad_configuration_exits_2_with_one_line(
    main: Main, extra: dict[str, str], named: str, command: str
) -> None:
    code, _, err = main([command], **extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], err
    assert "Traceback" not in err


def test_bad_configuration_exits_2_from_a_process_too(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    result = poller(["once"], bare_env, tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("poller: configuration error: MONGODB_URI is required"), line


def test_dotenv_file_is_read(main: Main, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MONGODB_URI=mongodb://localhost/x\nWAHA_URL=gopher://x\n")
    code, _, err = main(["once"])
    assert code == 2 and "WAHA_URL" in err


@pytest.mark.parametrize(
    "args", [["--help"], ["run", "--help"], ["once", "--help"], ["demo", "--help"]]
)
def test_help(main: Main, args: list[str]) -> None:
    code, out, _ = main(args)
    assert code == 0
    assert "usage: poller" in out
    if args != ["demo", "--help"] and args != ["--help"]:
        assert "MONGODB_URI" in out


# -- poller once ----------------------------------------------------------------------------------


def test_once_sends_due_messages_and_exits_0(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    store.messages.collection.insert_one(message(utcnow()))
    result = poller(["once"], environment(settings), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tick: claimed=1 sent=1" in result.stderr
    assert len(waha.sent) == 1


def test_once_exits_1_when_waha_refuses_the_key(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    store.messages.collection.insert_one(message(utcnow()))
    result = poller(["once"], environment(settings, WAHA_API_KEY="wrong"), tmp_path)
    assert result.returncode == 1
    assert "WAHA rejected the API key" in result.stderr


def test_once_exits_1_when_mongodb_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    env = environment(
        settings, MONGODB_URI="mongodb://127.0.0.1:1/poller", MONGODB_TIMEOUT_SECONDS="2"
    )
    result = poller(["once"], env, tmp_path)
    assert result.returncode == 1
    assert "MongoDB is unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_logs(settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path) -> None:
    store.messages.collection.insert_one(message(utcnow()))
    result = poller(["once"], environment(settings, LOG_JSON="1"), tmp_path)
    assert result.returncode == 0
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("tick: claimed=1 sent=1" in r["record"]["message"] for r in records)


@pytest.mark.timeout(300)  # four poller processes, each up to 60 s on a busy machine
def test_secrets_never_reach_the_logs(
    mongo_uri: str, settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    password = MONGODB_PASSWORD
    admin: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    user = f"poller_{os.getpid()}_{time.monotonic_ns()}"
    admin[settings.mongodb_db].command("createUser", user, pwd=password, roles=["readWrite"])
    host = mongo_uri.split("://", 1)[1].split("/", 1)[0]
    good = f"mongodb://{user}:{password}@{host}/{settings.mongodb_db}"
    bad = f"mongodb://{user}:{password}-wrong@{host}/{settings.mongodb_db}"
    wrong_key = WRONG_KEY

    def once(**extra: str) -> subprocess.CompletedProcess[str]:
        store.messages.collection.insert_one(
            message(utcnow(), chat_id=f"44770090{len(waha.requests):04d}")
        )
        return poller(["once"], environment(settings, **extra), tmp_path)

    runs = [
        once(MONGODB_URI=good, WAHA_API_KEY=wrong_key),
        once(MONGODB_URI=good, WAHA_URL="http://127.0.0.1:1"),
        once(MONGODB_URI=bad),
        once(MONGODB_URI=good, LOG_LEVEL="DEBUG"),
    ]
    admin[settings.mongodb_db].command("dropUser", user)
    admin.close()
    assert [r.returncode for r in runs] == [1, 0, 1, 0]
    assert "could not be reached" in runs[1].stderr
    # The key's, WAHA's and MongoDB's failures held their messages back; the last run sent all.
    assert "sent=4" in runs[3].stderr
    assert len(waha.sent) == 4
    for run in runs:
        output = run.stdout + run.stderr
        assert password not in output
        assert settings.waha_api_key not in output and wrong_key not in output


# -- poller run -----------------------------------------------------------------------------------


def hold_sends(waha: WahaSimulator) -> tuple[threading.Event, threading.Event]:
    """Each sendText waits, once WAHA has it, until `release` is set; `arrived` is set when the
    first one comes. (The simulator calls its validator with every request, before answering.)"""
    arrived, release = threading.Event(), threading.Event()
    validate = waha.validator

    def hold(request: Request) -> str | None:
        if request.path == "/api/sendText":
            arrived.set()
            release.wait(120)
        return validate(request) if validate else None

    waha.validator = hold
    return arrived, release


@pytest.mark.parametrize(
    ("command", "signum"),
    [("run", signal.SIGTERM), ("run", signal.SIGINT), ("once", signal.SIGTERM)],
)
@pytest.mark.timeout(240)
def test_stops_gracefully_on_signal(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path, command: str, signum: int
) -> None:
    arrived, release = hold_sends(waha)  # the first message is in flight when the signal comes
    now = utcnow()
    ids = store.messages.collection.insert_many(
        [message(now - seconds(n), chat_id=f"4477009000{n:02d}") for n in range(4)]
    ).inserted_ids
    log = tmp_path / "poller.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            POLLER + [command], env=environment(settings), cwd=tmp_path, stderr=stderr
        )
    try:
        wait_until(arrived.is_set, 60, "the poller sends")
        process.send_signal(signum)
        wait_until(lambda: "finishing the message in flight" in log.read_text(), 60, "the signal")
        release.set()
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        release.set()
        process.kill()
    stderr_text = log.read_text()
    last = "stopped" if command == "run" else "tick: claimed=4 sent=1"
    assert last in stderr_text.rstrip().splitlines()[-1]
    assert len(sends(waha)) == 1, "nothing is sent after the signal"
    docs = {d["_id"]: d for d in store.messages.collection.find()}
    assert docs[ids[3]]["status"] == "sent", "the message in flight (the oldest) was finished"
    for message_id in ids[:3]:
        assert docs[message_id]["status"] == "pending" and docs[message_id]["isPicked"] is False


def test_run_ticks_on_its_interval(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "poller.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            POLLER + ["run"],
            # Idle ticks log at DEBUG.
            env=environment(settings, POLL_INTERVAL_SECONDS="0.5", LOG_LEVEL="DEBUG"),
            cwd=tmp_path,
            stderr=stderr,
        )
    try:
        # Nothing to send: only the timer ticks (and the watcher, once, at start).
        wait_until(lambda: log.read_text().count("tick: ") >= 5, 60, "five ticks")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def test_run_exits_1_when_mongodb_is_unreachable_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    env = environment(
        settings, MONGODB_URI="mongodb://127.0.0.1:1/poller", MONGODB_TIMEOUT_SECONDS="2"
    )
    result = poller(["run"], env, tmp_path)
    assert result.returncode == 1
    assert "crashed: MongoDB is unavailable at start-up" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_sends_a_campaign(bare_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        POLLER + ["demo"], env=bare_env, cwd=tmp_path, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, result.stderr
    assert "WAHA received 4 message(s) that went out, paced 2-4 s apart" in result.stdout
    assert "Campaign 'Spring sale': completed," in result.stdout
    assert "not-a-number               failed" in result.stdout
    assert "expired" in result.stdout
