"""Scheduling messages without writing MongoDB by hand: `poller send`, `poller import` and the
library call each put a message in that a real `poller run` delivers once; the import checks
every row before writing, is idempotent, and its dry run plans as the poller then does."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from support import POLLER, environment, replicas, utcnow, wait_until

import poller
from poller import campaign_import, scheduling
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient

CSV = "phone,name,city\n447700900001,Ann,Leeds\n+44 7700 900002,Bob,York\n447700900003,Cat,Bath\n"


def cli(
    settings: Settings, folder: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*POLLER, *args],
        env=environment(settings, **env),
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_send_import_and_the_library_each_reach_whatsapp_once_through_poller_run(
    settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    env = environment(settings, POLL_INTERVAL_SECONDS="1")
    (tmp_path / "people.csv").write_text(CSV)
    with replicas([env], tmp_path):
        sent = cli(settings, tmp_path, "send", "--to", "+44 7700 900010", "--text", "From the CLI")
        assert sent.returncode == 0, sent.stderr
        assert "written: to 447700900010@c.us" in sent.stdout
        imported = cli(
            settings,
            tmp_path,
            "import",
            "people.csv",
            "--campaign",
            "December newsletter",
            "--text",
            "Hi {name} in {city}!",
        )
        assert imported.returncode == 0, imported.stderr
        assert "3 messages written" in imported.stdout
        library_id = poller.schedule("447700900020", "From Python", env=env)
        wait_until(lambda: len(waha.sent) >= 5, 120, "five messages delivered")
    texts = sorted(m.text for m in waha.sent)
    assert texts == sorted(
        ["From the CLI", "From Python", "Hi Ann in Leeds!", "Hi Bob in York!", "Hi Cat in Bath!"]
    )
    assert len({m.chat_id for m in waha.sent}) == 5, "each once"
    doc = store.messages.collection.find_one({"_id": scheduling.message_id(library_id)})
    assert doc is not None and doc["status"] == "sent"


def test_send_prints_when_the_poller_plans_it_or_not_yet(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    later = cli(settings, tmp_path, "send", "--to", "447700900001", "--text", "x", "--in", "2h")
    assert later.returncode == 0, later.stderr
    assert "not planned yet" in later.stdout
    [doc] = store.messages.collection.find()
    assert doc["scheduledAt"] > datetime.now(UTC) + timedelta(minutes=110)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--to", "not a number", "--text", "x"], "to:"),
        (["--to", "447700900001"], "text:"),
        (["--to", "447700900001", "--text", "x", "--at", "tomorrow"], "at:"),
        (["--to", "447700900001", "--text", "x", "--in", "soon"], "in:"),
        (["--to", "447700900001", "--text", "x", "--at", "2020-01-01T00:00"], "at:"),
        (["--to", "447700900001", "--text", "x", "--image", "/no/such.png"], "image:"),
    ],
)
def test_send_names_the_field_that_is_wrong_and_writes_nothing(
    settings: Settings, store: Store, tmp_path: Path, args: list[str], field: str
) -> None:
    result = cli(settings, tmp_path, "send", *args)
    assert result.returncode == 2 and f"poller: {field}" in result.stderr, result.stderr
    assert store.messages.collection.count_documents({}) == 0


def draft(store: Store, text: str, template: str = "Hi {name}", **fields: Any) -> Any:
    columns, rows = campaign_import.read_csv(text)
    args: dict[str, Any] = {
        "at": None,
        "now": utcnow(),
        "zone": ZoneInfo("UTC"),
        "lookback": timedelta(seconds=120),
    }
    args.update(fields)
    return campaign_import.draft(store, "Newsletter", columns, rows, template, **args)


@pytest.mark.parametrize(
    ("csv", "template", "problem"),
    [
        ("phone,name\nabc,Ann\n", "Hi {name}", "row 2: 'abc' is not a phone number"),
        ("phone,name\n447700900001,\n", "Hi {name}", "row 2: {name} empty in this row"),
        (
            "phone,name\n447700900001,Ann\n+44 7700 900001,Bo\n",
            "Hi {name}",
            "row 3: 447700900001@c.us is also on row 2",
        ),
        ("phone,name\n447700900001,Ann\n", "Hi {nmae}", "text: {nmae} names no column"),
        ("number_x,name\n447700900001,Ann\n", "Hi {name}", "column: no column named phone"),
        ("phone,name\n", "Hi {name}", "file: no rows below the header"),
        ("phone,name\n447700900001,Ann\n", "Hi {name!r}", "only plain {column} variables"),
    ],
)
def test_each_import_check_reports_its_row_and_nothing_is_written(
    store: Store, csv: str, template: str, problem: str
) -> None:
    with pytest.raises(scheduling.Invalid) as raised:
        draft(store, csv, template)
    assert any(problem in p for p in raised.value.problems), raised.value.problems
    assert store.messages.collection.count_documents({}) == 0


def test_a_recipient_who_opted_out_is_reported(store: Store) -> None:
    store.optouts.add("default", "447700900002@c.us", utcnow(), "STOP")
    with pytest.raises(scheduling.Invalid) as raised:
        draft(store, CSV)
    assert raised.value.problems == ["row 3: 447700900002@c.us opted out of default"]


def test_the_text_is_rendered_at_import_and_importing_again_adds_nothing(store: Store) -> None:
    first = draft(store, CSV, "Hi {name} ({phone}) {{not a variable}}")
    assert campaign_import.commit(store, first) == (3, True)
    again = draft(store, CSV, "Hi {name} ({phone}) {{not a variable}}")
    assert campaign_import.commit(store, again) == (0, False)
    assert store.messages.collection.count_documents({}) == 3
    assert store.campaigns.collection.count_documents({}) == 1
    texts = sorted(d["content"] for d in store.messages.collection.find())
    assert texts[0] == "Hi Ann (447700900001) {not a variable}"


def test_the_dry_run_plans_as_the_poller_then_does(
    store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    now = utcnow()
    rows = "phone,name\n" + "".join(f"4477009001{n:02d},P{n}\n" for n in range(6))
    plan = draft(store, rows, now=now)
    pacing = Pacing(3, 3)
    found = campaign_import.preview(store, pacing, plan, now)
    assert store.messages.collection.count_documents({}) == 0, "a dry run writes nothing"
    campaign_import.commit(store, plan)
    tick(store, client, 20, now=now, pacing=pacing)
    planned = [d.get("slotAt") or d["plannedAt"] for d in store.messages.collection.find()]
    assert found.eta == max(planned) == now + timedelta(seconds=15)
    assert found.sessions["default"]["first"] == min(planned) == now
