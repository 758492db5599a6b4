"""The `poller` command as a user runs it: real processes, real signals, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from support import MONGODB_PASSWORD, POLLER, WRONG_KEY, environment, message, seconds, utcnow

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


@pytest.fixture
def bare_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment with no poller settings at all, run from an empty folder (no .env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGODB", "WAHA", "LOG"))}
    yield env


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
    ],
)
@pytest.mark.parametrize("command", ["run", "once"])
def test_bad_configuration_exits_2_with_one_line(
    bare_env: dict[str, str], tmp_path: Path, extra: dict[str, str], named: str, command: str
) -> None:
    result = poller([command], {**bare_env, **extra}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_dotenv_file_is_read(bare_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MONGODB_URI=mongodb://localhost/x\nWAHA_URL=gopher://x\n")
    result = poller(["once"], bare_env, tmp_path)
    assert result.returncode == 2 and "WAHA_URL" in result.stderr


@pytest.mark.parametrize(
    "args", [["--help"], ["run", "--help"], ["once", "--help"], ["demo", "--help"]]
)
def test_help(bare_env: dict[str, str], tmp_path: Path, args: list[str]) -> None:
    result = poller(args, bare_env, tmp_path)
    assert result.returncode == 0
    assert "usage: poller" in result.stdout
    if args != ["demo", "--help"] and args != ["--help"]:
        assert "MONGODB_URI" in result.stdout


# -- poller once ----------------------------------------------------------------------------------


def test_once_sends_due_messages_and_exits_0(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    store.messages.insert_one(message(utcnow()))
    result = poller(["once"], environment(settings), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tick: claimed=1 sent=1" in result.stderr
    assert len(waha.sent) == 1


def test_once_exits_1_when_waha_refuses_the_key(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    store.messages.insert_one(message(utcnow()))
    result = poller(["once"], environment(settings, WAHA_API_KEY="wrong"), tmp_path)
    assert result.returncode == 1
    assert "WAHA rejected the API key" in result.stderr


def test_once_exits_1_when_mongodb_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    env = environment(settings, MONGODB_URI="mongodb://127.0.0.1:1/poller")
    result = poller(["once"], env, tmp_path)
    assert result.returncode == 1
    assert "MongoDB is unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_logs(settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path) -> None:
    store.messages.insert_one(message(utcnow()))
    result = poller(["once"], environment(settings, LOG_JSON="1"), tmp_path)
    assert result.returncode == 0
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("tick: claimed=1 sent=1" in r["record"]["message"] for r in records)


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
        store.messages.insert_one(message(utcnow(), chat_id=f"44770090{len(waha.requests):04d}"))
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


@pytest.mark.parametrize(
    ("command", "signum"),
    [("run", signal.SIGTERM), ("run", signal.SIGINT), ("once", signal.SIGTERM)],
)
def test_stops_gracefully_on_signal(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path, command: str, signum: int
) -> None:
    waha.latency = 1.5  # the first message is in flight when the signal arrives
    now = utcnow()
    ids = store.messages.insert_many(
        [message(now - seconds(n), chat_id=f"4477009000{n:02d}") for n in range(4)]
    ).inserted_ids
    process = subprocess.Popen(
        POLLER + [command],
        env=environment(settings),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sends(waha) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sends(waha), "the poller never sent"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "finishing the message in flight" in stderr
    last = "stopped" if command == "run" else "tick: claimed=4 sent=1"
    assert last in stderr.rstrip().splitlines()[-1]
    assert len(sends(waha)) == 1, "nothing is sent after the signal"
    docs = {d["_id"]: d for d in store.messages.find()}
    assert docs[ids[3]]["status"] == "sent", "the message in flight (the oldest) was finished"
    for message_id in ids[:3]:
        assert docs[message_id]["status"] == "pending" and docs[message_id]["isPicked"] is False


def test_run_ticks_on_its_interval(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "poller.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            POLLER + ["run"],
            env=environment(settings, POLL_INTERVAL_SECONDS="0.5"),
            cwd=tmp_path,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 20
        while "tick: " not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # nothing to send: only the timer ticks (and the watcher, once, at start)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert log.read_text().count("tick: ") >= 5


def test_run_exits_1_when_mongodb_is_unreachable_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    env = environment(settings, MONGODB_URI="mongodb://127.0.0.1:1/poller")
    result = poller(["run"], env, tmp_path)
    assert result.returncode == 1
    assert "crashed: MongoDB is unavailable at start-up" in result.stderr


def test_demo_sends_a_campaign(bare_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        POLLER + ["demo"], env=bare_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "WAHA received 4 message(s) that went out, paced 2-4 s apart" in result.stdout
    assert "Campaign 'Spring sale': completed," in result.stdout
    assert "not-a-number               failed" in result.stdout
    assert "expired" in result.stdout
