"""The status bridge: heartbeats, `poller check`, `poller status`, `run_once`, concurrent `once`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from support import POLLER, environment, message, seconds, utcnow

import poller
from poller import status
from poller.daemon import Poller
from poller.metrics import Metrics
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import free_port
from poller.testing.waha import WahaSimulator


def test_heartbeat_document(settings: Settings, waha: WahaSimulator) -> None:
    waha.sessions.update({"sales": "SCAN_QR_CODE"})
    instance = Poller(settings)
    instance.start()
    instance.tick()
    instance.heartbeat()
    beat = instance.store.heartbeats.collection.find_one({"_id": instance.store.owner})
    index = instance.store.heartbeats.collection.index_information()["poller_heartbeat_expiry"]
    instance.close()
    assert beat is not None
    assert beat["instance"] == settings.instance_id and beat["pid"] == os.getpid()
    assert beat["version"] == poller.__version__ and beat["host"]
    assert beat["startedAt"] <= beat["lastTickAt"] <= beat["lastSeenAt"]
    assert beat["lastTick"]["claimed"] == 0
    assert beat["wahaSessions"] == [
        {"name": "default", "status": "WORKING"},
        {"name": "sales", "status": "SCAN_QR_CODE"},
    ]
    assert beat["aliveUntil"] == beat["lastSeenAt"] + 3 * seconds(settings.heartbeat_seconds)
    assert beat["ticking"] is True and beat["tickRunningSince"] is None
    assert index["key"] == [("aliveUntil", 1)] and index["expireAfterSeconds"] == 0


def test_heartbeat_when_waha_is_down(make_settings: Callable[..., Settings]) -> None:
    instance = Poller(make_settings(waha_url="http://127.0.0.1:1"))
    instance.start()
    instance.heartbeat()
    beat = instance.store.heartbeats.collection.find_one({"_id": instance.store.owner})
    instance.close()
    assert beat is not None and beat["wahaSessions"] is None


def test_check(settings: Settings, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.check(settings) == 1
    assert "no live heartbeat from a poller" in capsys.readouterr().out

    now = utcnow()

    def beat(_id: str, host: str, alive: float, ticking: bool = True) -> None:
        store.heartbeats.collection.insert_one(
            {
                "_id": _id,
                "instance": _id.split("/")[0],
                "host": host,
                "lastSeenAt": now - seconds(1),
                "aliveUntil": now + seconds(alive),
                "ticking": ticking,
            }
        )

    beat("vps-1/ab", "vps", alive=29)
    beat("old/cd", "gone", alive=-1)
    beat("stuck/ef", "jammed", alive=29, ticking=False)
    assert status.check(settings) == 0
    assert capsys.readouterr().out.startswith("ok: 2 live, vps-1/ab on vps seen")
    assert status.check(settings, "vps-1") == 0
    assert status.check(settings, "vps") == 0  # by host, as `--local` asks
    capsys.readouterr()
    assert status.check(settings, "old") == 1
    assert "no live heartbeat from poller 'old'" in capsys.readouterr().out
    assert status.check(settings, "stuck") == 1
    assert "stuck/ef is alive but its ticks stopped completing" in capsys.readouterr().out


@pytest.mark.parametrize("uri", ["mongodb://127.0.0.1:1/x", "mongodb+srv://nowhere.invalid/x"])
def test_check_without_mongodb(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str], uri: str
) -> None:
    settings = make_settings(mongodb_uri=uri, mongodb_timeout_seconds=0.5)
    assert status.check(settings) == 1
    out = capsys.readouterr().out
    assert out.startswith("poller check: MongoDB is unavailable") and out.count("\n") == 1


def test_status(
    settings: Settings, store: Store, waha: WahaSimulator, capsys: pytest.CaptureFixture[str]
) -> None:
    now = utcnow()
    campaign = store.campaigns.collection.insert_one(
        {"name": "Black Friday", "status": "running"}
    ).inserted_id
    store.messages.collection.insert_many(
        [
            message(now - seconds(1), campaignId=campaign, chat_id="447700900001"),
            message(now - seconds(1), campaignId=campaign, chat_id="bad"),
            message(now + timedelta(hours=1), campaignId=campaign, chat_id="447700900003"),
            message(now - seconds(600), chat_id="447700900004"),
        ]
    )
    instance = Poller(settings)
    instance.start()
    instance.tick()
    store.messages.collection.insert_one(message(utcnow() - seconds(1), chat_id="447700900005"))
    instance.heartbeat()
    instance.close()

    assert status.status(settings, as_json=True) == 0
    overview = json.loads(capsys.readouterr().out)
    assert overview["messages"] == {"dueNow": 1, "inProgress": 0, "scheduledLater": 1}
    assert overview["last24h"] == {
        "sent": 1,
        "failed": 1,
        "expired": 1,
        "unknown": 0,
        "cancelled": 0,
        "delivered": 0,
        "read": 0,
        "optedOut": 0,
    }
    [running] = overview["campaigns"]
    assert running["name"] == "Black Friday" and running["stats"]["total"] == 3
    assert [i["instance"] for i in overview["instances"]] == [settings.instance_id]

    assert status.status(settings) == 0
    text = capsys.readouterr().out
    assert "Pollers (live)" in text and "WORKING" in text
    assert "Black Friday" in text and "67%" in text


def test_run_once_from_python(settings: Settings, store: Store, waha: WahaSimulator) -> None:
    store.messages.collection.insert_one(message(utcnow()))
    counts = poller.run_once(environment(settings))
    assert counts["sent"] == 1 and counts["claimed"] == 1 and counts["key_rejected"] is False
    assert len(waha.sent) == 1
    store.messages.collection.insert_one(message(utcnow(), chat_id="447700900999"))
    with pytest.raises(PermissionError, match="WAHA rejected the API key"):
        poller.run_once(environment(settings, WAHA_API_KEY="wrong"))
    assert len(waha.sent) == 1


def test_health_follows_heartbeats_and_ticks(settings: Settings, waha: WahaSimulator) -> None:
    instance = Poller(settings)
    instance.start()
    assert not instance.healthy(), "no heartbeat yet"
    instance.heartbeat()
    assert instance.healthy()
    # Ticks stopped completing: started long ago, none finished since.
    instance.started_at -= timedelta(seconds=2 * settings.poll_interval_seconds + 61)
    assert not instance.healthy()
    instance.tick()
    assert instance.healthy()
    instance.last_beat = utcnow() - 3 * seconds(settings.heartbeat_seconds) - seconds(1)
    assert not instance.healthy(), "heartbeats stopped"
    instance.close()


def test_two_once_at_the_same_moment_send_each_message_once(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    now = utcnow()
    chats = [f"44770091{n:04d}@c.us" for n in range(40)]
    store.messages.collection.insert_many([message(now, chat_id=c) for c in chats])
    env = environment(settings, BATCH_SIZE="5")
    runs = [
        subprocess.Popen(
            POLLER + ["once"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.communicate(timeout=120)[1], p.returncode) for p in runs]
    assert [code for _, code in results] == [0, 0], results
    assert sorted(m.chat_id for m in waha.sent) == sorted(chats)


def test_run_writes_a_heartbeat_and_removes_it_on_stop(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    env = environment(settings, HEARTBEAT_SECONDS="0.5", POLLER_INSTANCE_ID="vps-7")
    process = subprocess.Popen(
        POLLER + ["run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120  # a busy machine starts it slowly
        while store.heartbeats.collection.count_documents({"instance": "vps-7"}) == 0:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.1)
        alive = subprocess.run(
            POLLER + ["check", "--instance", "vps-7"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        local = subprocess.run(
            POLLER + ["check", "--local"], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert alive.returncode == 0 and alive.stdout.startswith("ok: 1 live, vps-7/")
    assert local.returncode == 0
    assert store.heartbeats.collection.count_documents({}) == 0, "removed on a clean stop"
    gone = subprocess.run(POLLER + ["check"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert gone.returncode == 1 and "no live heartbeat" in gone.stdout


def test_metrics_and_healthz(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    port = free_port()
    env = environment(settings, HEALTH_PORT=str(port), POLL_INTERVAL_SECONDS="0.5")
    store.messages.collection.insert_one(message(utcnow() - seconds(2)))
    store.messages.collection.insert_one(message(utcnow(), chat_id="bad"))
    process = subprocess.Popen(
        POLLER + ["run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120  # a busy machine starts it slowly
        text = ""
        while 'poller_messages_total{outcome="sent"} 1.0' not in text:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.ConnectError:
                continue
        health = httpx.get(f"http://127.0.0.1:{port}/healthz")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert 'poller_messages_total{outcome="failed"} 1.0' in text
    assert 'poller_messages_total{outcome="expired"} 0.0' in text
    assert "poller_tick_seconds_count" in text
    assert "poller_messages_due 0.0" in text
    lateness = re.search(r"poller_send_lateness_seconds_sum (\S+)", text)
    assert lateness and 2.0 <= float(lateness.group(1)) < 30
    assert "poller_send_lateness_seconds_count 1.0" in text
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_metrics_port_in_use_is_a_clear_crash(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            POLLER + ["run"],
            env=environment(settings, HEALTH_PORT=str(port)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"crashed: cannot serve metrics on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("healthy", [True, False])
def test_healthz_answers_what_health_says(healthy: bool) -> None:
    port = free_port()
    server = Metrics().serve("127.0.0.1", port, lambda: healthy)
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
    assert answer.status_code == (200 if healthy else 503)
    assert answer.json() == {"status": "ok" if healthy else "down"}
    assert 'poller_messages_total{outcome="sent"} 0.0' in metrics.text


def test_status_reads_a_sessions_daily_cap_as_the_tick_does(
    settings: Settings, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.sessions.collection.insert_one({"name": "default", "dailyCap": "ten"})
    store.turns.ensure(["default"])
    assert status.status(settings, as_json=True) == 0
    (row,) = json.loads(capsys.readouterr().out)["sessions"]
    assert row["dailyCap"] is None and "is not a whole number" in row["notSending"]
