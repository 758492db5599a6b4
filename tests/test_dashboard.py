"""The dashboard in a real browser: Debian's chromium, driven by Playwright (executable_path).

The campaign flow runs a real `poller run` with the dashboard on, sending through the WAHA
simulator; the other tests serve the dashboard from this process over the test's database.
Without chromium these tests are skipped, except in CI (`CI` set), where they fail: `.ci/run`
installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger
from support import (
    DASHBOARD_TOKEN,
    WRONG_KEY,
    environment,
    message,
    replicas,
    seconds,
    utcnow,
    wait_until,
)

from poller.dashboard import Dashboard
from poller.dashboard.auth import Auth
from poller.metrics import Metrics
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.mongo import free_port
from poller.testing.waha import WahaSimulator
from poller.tick import tick
from poller.waha import WahaClient

ROOT = Path(__file__).resolve().parents[1]
# Where test_screenshots_of_one_moment saves its pictures: README's are updated with
# DASHBOARD_SCREENSHOT=docs/dashboard.png, the phone's beside it (docs/dashboard-phone.png);
# otherwise they go to the test's own folder.
SCREENSHOT = os.environ.get("DASHBOARD_SCREENSHOT")
PHONE_SCREENSHOT = SCREENSHOT and str(Path(SCREENSHOT).with_stem(Path(SCREENSHOT).stem + "-phone"))
PHONE = {"width": 390, "height": 844}
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI), where chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()


@contextmanager
def opened(browser: Any, viewport: dict[str, int]) -> Iterator[Any]:
    """A page in a browser context of its own, `viewport` wide and high."""
    context = browser.new_context(viewport=viewport)
    opened = context.new_page()
    opened.set_default_timeout(60_000)  # generous: a busy machine is slow, never different
    dialogs: list[str] = []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    opened.dialogs = dialogs
    try:
        yield opened
    finally:
        context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    with opened(browser, {"width": 1280, "height": 900}) as desktop:
        yield desktop


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    with opened(browser, PHONE) as small:
        yield small


@pytest.fixture
def served(store: Store) -> Iterator[str]:
    """The dashboard over the test's database, served from this process: its base URL."""
    port = free_port()
    server = Metrics().serve(
        "127.0.0.1", port, lambda: True, None, Dashboard(store, Pacing(), DASHBOARD_TOKEN)
    )
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def log_in(page: Any, base: str, token: str = DASHBOARD_TOKEN) -> None:
    page.goto(base)
    page.fill("#token", token)
    page.click("button[type=submit]")


def campaign_counts(page: Any, name: str) -> dict[str, int]:
    """The counts the page shows under a campaign: {"sent": 3, "cancelled": 0, ...}."""
    text = page.locator(".campaign", has_text=name).locator(".counts").inner_text()
    return {key: int(n) for key, n in re.findall(r"(\w+) (\d+)", text)}


def test_log_in_watch_a_campaign_then_pause_resume_and_cancel_it(
    page: Any, settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    db = store.messages.collection.database
    campaign = (
        db[settings.campaigns_collection]
        .insert_one({"name": "Black Friday", "status": "running"})
        .inserted_id
    )
    now = utcnow()
    # Long enough (a minute, paced) to be still running when the browser has logged in.
    chats = [f"4477{n:08d}@c.us" for n in range(40)]
    store.messages.collection.insert_many(
        [
            message(now, chat_id=chat, campaignId=campaign, content=f"Offer {n}")
            for n, chat in enumerate(chats)
        ]
    )
    port = free_port()
    env = environment(
        settings,
        HEALTH_PORT=str(port),
        DASHBOARD_TOKEN=DASHBOARD_TOKEN,
        PACING_MIN_SECONDS="1.5",
        PACING_MAX_SECONDS="1.5",
        POLL_INTERVAL_SECONDS="2",
        HEARTBEAT_SECONDS="1",
    )
    base = f"http://127.0.0.1:{port}"
    with replicas([env], tmp_path):
        wait_until(lambda: _healthy(base), 120, "poller run serves its dashboard")
        log_in(page, base)
        page.wait_for_selector(".campaign >> text=Black Friday")

        # Its progress advances as WAHA receives the messages.
        wait_until(lambda: campaign_counts(page, "Black Friday")["sent"] >= 2, 120, "progress")
        seen = campaign_counts(page, "Black Friday")["sent"]
        wait_until(lambda: campaign_counts(page, "Black Friday")["sent"] > seen, 120, "advance")

        # Pause: once the poller has held it, WAHA receives nothing more for it.
        page.locator(".campaign", has_text="Black Friday").get_by_role(
            "button", name="Pause"
        ).click()
        campaigns = db[settings.campaigns_collection]
        wait_until(lambda: (campaigns.find_one({"_id": campaign}) or {}).get("heldAt"), 60, "held")
        held_at = campaigns.find_one({"_id": campaign})["heldAt"]  # type: ignore[index]
        delivered = len(waha.sent)
        ticks = set()

        def two_ticks_since_held() -> bool:
            beat = db[settings.heartbeats_collection].find_one() or {}
            if beat.get("lastTickAt") and beat["lastTickAt"] > held_at:
                ticks.add(beat["lastTickAt"])
            return len(ticks) >= 2

        wait_until(two_ticks_since_held, 60, "two ticks after the pause")
        assert len(waha.sent) == delivered, "sent while paused"
        page.locator(".campaign", has_text="Black Friday").locator(
            ".status", has_text="paused"
        ).wait_for()

        # Resume: it sends again.
        page.locator(".campaign", has_text="Black Friday").get_by_role(
            "button", name="Resume"
        ).click()
        wait_until(lambda: len(waha.sent) > delivered, 120, "sending after the resume")

        # Cancel (confirmed in the dialog): the rest ends cancelled, and the campaign leaves
        # the running list.
        page.locator(".campaign", has_text="Black Friday").get_by_role(
            "button", name="Cancel"
        ).click()
        wait_until(
            lambda: (campaigns.find_one({"_id": campaign}) or {}).get("completedAt"), 120, "settled"
        )
        page.locator(".campaign", has_text="Black Friday").wait_for(state="detached")
    assert page.dialogs == ["Cancel this campaign? Its unsent messages end cancelled."]
    statuses = [d["status"] for d in store.messages.collection.find()]
    assert set(statuses) <= {"sent", "cancelled"} and statuses.count("cancelled") > 0
    assert sorted(m.chat_id for m in waha.sent) == sorted(set(m.chat_id for m in waha.sent))
    assert statuses.count("sent") == len(waha.sent)


def test_values_from_the_database_render_as_text(
    page: Any, served: str, settings: Settings, store: Store
) -> None:
    db = store.messages.collection.database
    name = "<script>alert(1)</script>"
    db[settings.campaigns_collection].insert_one(
        {"name": name, "status": "running", "stats": {"total": 1, "sent": 0, "failed": 1}}
    )
    text = '<img src=x onerror="alert(2)">'
    store.messages.collection.insert_one(
        {
            **message(utcnow(), chat_id="<b>bold</b>@c.us", content=text),
            "status": "failed",
            "finishedAt": utcnow(),
            "lastError": "<i>WAHA refused</i> it",
        }
    )
    log_in(page, served)
    page.get_by_text(name, exact=True).wait_for()
    for shown in (text, "<b>bold</b>@c.us", "<i>WAHA refused</i> it"):
        assert page.get_by_text(shown, exact=True).count() == 1, shown
    assert page.locator("img").count() == 0 and page.locator("td b, td i").count() == 0
    assert page.locator("script").count() == 1  # the page's own app.js only
    assert page.dialogs == []


def test_a_wrong_or_missing_secret_is_refused_and_shows_nothing(
    page: Any, served: str, settings: Settings, store: Store
) -> None:
    db = store.messages.collection.database
    db[settings.campaigns_collection].insert_one(
        {"name": "Secret sale", "status": "running", "stats": {"total": 1}}
    )
    store.messages.collection.insert_one(message(utcnow(), chat_id="447700900999@c.us"))

    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    page.goto(served)  # no secret: the log-in form, nothing from the database
    assert page.locator("#token").is_visible()
    assert "Secret sale" not in page.content() and "447700900999" not in page.content()
    log_in(page, served, WRONG_KEY)
    page.locator("#failed", has_text="That is not the token").wait_for()
    assert "Secret sale" not in page.content()
    assert page.evaluate("fetch('/api/status').then(r => r.status)") == 401
    assert page.evaluate("fetch('/static/app.js').then(r => r.status)") == 401
    # Logged without the attempted secret (the suite's scan fails the test if it shows).
    logger.remove(sink)
    assert [line for line in lines if "log-in" in line] == [
        "dashboard: failed log-in from 127.0.0.1\n"
    ]
    assert not any(WRONG_KEY in line for line in lines)

    with httpx.Client(base_url=served) as http:
        assert http.get("/api/status").status_code == 401
        wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
        assert http.get("/api/status", headers=wrong).status_code == 401
        assert http.get("/healthz").status_code == 200  # the one exemption
        right = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
        answer = http.get("/api/status", headers=right)
        assert answer.status_code == 200
        assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")
        body = answer.json()
        assert body["campaigns"][0]["name"] == "Secret sale"
        assert DASHBOARD_TOKEN not in answer.text and settings.mongodb_uri not in answer.text


def test_actions_need_this_sites_page_or_the_token(
    served: str, settings: Settings, store: Store
) -> None:
    campaigns = store.messages.collection.database[settings.campaigns_collection]
    campaign = campaigns.insert_one({"name": "C", "status": "running", "stats": {"total": 1}})
    path = f"/api/campaigns/{campaign.inserted_id}/pause"
    with httpx.Client(base_url=served, follow_redirects=False) as http:
        login = http.post("/login", data={"token": DASHBOARD_TOKEN})
        assert login.status_code == 303
        cookie = login.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert DASHBOARD_TOKEN not in cookie
        csrf = http.get("/api/status").json()["csrf"]
        assert http.post(path).status_code == 403, "no CSRF token"
        other = {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
        assert http.post(path, headers=other).status_code == 403, "another site's page"
        assert campaigns.find_one({"_id": campaign.inserted_id})["status"] == "running"  # type: ignore[index]
        assert http.post(path, headers={"X-CSRF-Token": csrf}).status_code == 200
        assert http.get(path).status_code == 405, "actions are POSTs"
    assert campaigns.find_one({"_id": campaign.inserted_id})["status"] == "paused"  # type: ignore[index]
    with httpx.Client(base_url=served) as script:
        bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
        resume = f"/api/campaigns/{campaign.inserted_id}/resume"
        assert script.post(resume, headers=bearer).json() == {
            "campaign": str(campaign.inserted_id),
            "status": "running",
        }
        assert script.post("/api/campaigns/nope/cancel", headers=bearer).status_code == 404


def test_odd_requests_get_clear_answers(served: str, settings: Settings, store: Store) -> None:
    campaigns = store.messages.collection.database[settings.campaigns_collection]
    draft = campaigns.insert_one({"name": "Draft", "status": "draft"}).inserted_id
    running = campaigns.insert_one({"name": "R", "status": "running", "stats": {"total": 1}})
    bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
    with httpx.Client(base_url=served, follow_redirects=False) as http:
        # A campaign the poller never worked on is not written to; only a paused one resumes.
        assert http.post(f"/api/campaigns/{draft}/pause", headers=bearer).status_code == 404
        resume = f"/api/campaigns/{running.inserted_id}/resume"
        assert http.post(resume, headers=bearer).status_code == 404
        # Any characters in a cookie or a CSRF token: refused, never a crash.
        odd = {"Cookie": "poller_dashboard=123.\u00e9".encode()}
        assert http.get("/api/status", headers=odd).status_code == 401
        assert http.get("//api/status", headers=bearer).status_code == 404
        assert http.post("/logout", headers={"Origin": "http://evil.example"}).status_code == 403
    assert campaigns.find_one({"_id": draft})["status"] == "draft"  # type: ignore[index]


def test_the_activity_counts_each_minute_and_how_late_the_sends_went(store: Store) -> None:
    minute = utcnow().replace(second=0, microsecond=0) - seconds(600)
    ended = [("sent", 0.5), ("sent", 3), ("sent", 45), ("sent", -2), ("sent", 500)]
    store.messages.collection.insert_many(
        [
            {
                **message(minute, chat_id=f"4477{n:08d}"),
                "status": status,
                "sentAt": minute + seconds(late),
            }
            for n, (status, late) in enumerate(ended)
        ]
        + [
            {**message(minute, chat_id="447700000099"), "status": "failed", "finishedAt": minute},
            {
                **message(minute - seconds(90000), chat_id="447700000098"),
                "status": "sent",
                "sentAt": minute - seconds(90000),
            },  # older than the 24 hours asked for
        ]
    )
    since = minute - seconds(3600)
    lateness = {row["from"]: row["n"] for row in store.activity.lateness(since)}
    assert lateness == {0: 2, 1: 1, 5: 0, 30: 1, 60: 0, 120: 1}, "early sends count as on time"
    rows = store.activity.per_minute(since)
    at = minute.strftime("%Y-%m-%dT%H:%M")
    assert {"minute": at, "status": "failed", "n": 1} in rows
    assert sum(row["n"] for row in rows) == 6


def test_a_session_cookie_lapses_after_its_lifetime(store: Store) -> None:
    now = [utcnow()]
    port = free_port()
    served = Dashboard(store, Pacing(), DASHBOARD_TOKEN, clock=lambda: now[0])
    server = Metrics().serve("127.0.0.1", port, lambda: True, None, served)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.post("/login", data={"token": DASHBOARD_TOKEN}).status_code == 303
            now[0] += Auth.LIFETIME - seconds(60)
            assert http.get("/api/status").status_code == 200
            now[0] += seconds(120)
            assert http.get("/api/status").status_code == 401
    finally:
        server.shutdown()


def test_the_page_has_no_inline_script_and_is_light() -> None:
    static = ROOT / "poller" / "dashboard" / "static"
    for page in ("index.html", "login.html"):
        html = (static / page).read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
        assert " on" not in re.sub(r"\s+", " ", html).replace(" one", ""), "inline handler"
        assert "style=" not in html and "<style" not in html
    weight = sum((static / name).stat().st_size for name in ("index.html", "app.js", "app.css"))
    assert weight < 200 * 1024


def test_without_a_token_the_dashboard_is_not_even_imported() -> None:
    code = (
        "import sys, poller.daemon, poller.metrics; "
        "print('poller.dashboard' in sys.modules, 'werkzeug' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# Reasons as long as real ones get, with a word too long for a phone's line.
LONG_BLOCK = (
    "WhatsApp session 'sales' is SCAN_QR_CODE on WAHA server vps-2: scan the QR code in WAHA's "
    "dashboard (https://vps-2.example.com:3000/dashboard/sessions/sales/qr-code-for-pairing)"
)
LONG_PROBLEM = (
    "the cron expression '0 9 * * MON-FRI' needs a time zone that exists: Europe/Londres is "
    "not one (did you mean Europe/London?)"
)
LONG_WHY = (
    "WAHA refused the message (400: The number 447700900555@c.us is not registered on "
    "WhatsApp) after 3 attempts; ID=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
)


def lived_in(settings: Settings, store: Store) -> Any:
    """A database a dashboard shows a bit of everything from, with long reasons: a live poller
    whose second WAHA server lists session `sales` not WORKING, `sales` blocked, a campaign
    with a failed message, a schedule with a problem whose next occurrence is 5 days and
    3 hours away. The campaign's id."""
    db, now = store.messages.collection.database, utcnow()
    db[settings.heartbeats_collection].insert_one(
        {
            "_id": "vps-1:4242:a1b2c3/5f0e9d1c",
            "instance": "vps-1:4242:a1b2c3",
            "host": "vps-1",
            "version": "0.1.0",
            "ticking": True,
            "lastSeenAt": now,
            "lastTickAt": now,
            "aliveUntil": now + seconds(3600),
            "lastTick": {"sent": 3, "failed": 1},
            "wahaServers": [
                {
                    "name": "vps-1",
                    "url": "http://10.0.0.1:3000",
                    "reachable": True,
                    "keyAccepted": True,
                    "breaker": "closed",
                    "problem": None,
                    "sessions": [{"name": "default", "status": "WORKING"}],
                },
                {
                    "name": "vps-2",
                    "url": "http://10.0.0.2:3000",
                    "reachable": True,
                    "keyAccepted": True,
                    "breaker": "closed",
                    "problem": None,
                    "sessions": [{"name": "sales", "status": "SCAN_QR_CODE"}],
                },
            ],
        }
    )
    db[settings.pacing_collection].insert_one({"_id": "sales", "blocked": LONG_BLOCK})
    campaign = (
        db[settings.campaigns_collection]
        .insert_one(
            {
                "name": "Spring sale",
                "status": "running",
                "stats": {"total": 4, "sent": 2, "failed": 1},
                "eta": now + seconds(600),
            }
        )
        .inserted_id
    )
    db[settings.definitions_collection].insert_one(
        {
            "name": "Weekly digest",
            "cron": "0 9 * * MON-FRI",
            "timezone": "Europe/Londres",
            "isActive": True,
            "nextOccurrenceAt": now + seconds(5 * 86400 + 3 * 3600),
            "lastError": LONG_PROBLEM,
        }
    )
    store.messages.collection.insert_one(
        {
            **message(now - seconds(60), chat_id="447700900555@c.us", campaignId=campaign),
            "status": "failed",
            "finishedAt": now - seconds(30),
            "lastError": LONG_WHY,
        }
    )
    return campaign


def test_on_a_phone_every_field_and_reason_shows_on_the_screen(
    phone: Any, served: str, settings: Settings, store: Store
) -> None:
    lived_in(settings, store)
    log_in(phone, served)
    phone.get_by_text("Spring sale").first.wait_for()
    width = PHONE["width"]
    # The reasons, and the columns that sat off-screen beside them, in every table.
    cells = [phone.get_by_text(reason, exact=True) for reason in (LONG_BLOCK, LONG_PROBLEM)]
    cells.append(phone.locator("#notsent td", has_text="is not registered on WhatsApp"))
    cells.append(phone.locator("#servers td", has_text="sessions: sales SCAN_QR_CODE"))
    for section, label in (("sessions", "sent today"), ("schedules", "next occurrence")):
        cells.append(phone.locator(f"#{section} td[data-label='{label}']"))
    for cell in cells:
        assert cell.count() == 1, cell
        cell.scroll_into_view_if_needed()
        assert cell.is_visible(), cell
        box = cell.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (cell, box)
    # Each value is named on its own line, and nothing makes the page scroll sideways.
    assert phone.locator("#sessions td", has_text=LONG_BLOCK).get_attribute("data-label") == (
        "not sending because"
    )
    label = "getComputedStyle(document.querySelector('#notsent td'), '::before').content"
    assert phone.evaluate(label) == '"status"'
    assert phone.evaluate("document.scrollingElement.scrollWidth") <= width


def test_times_in_utc_spans_in_days_and_names_instead_of_ids(
    page: Any, served: str, settings: Settings, store: Store
) -> None:
    lived = lived_in(settings, store)
    store.messages.collection.insert_one(  # of no campaign
        {
            **message(utcnow(), chat_id="447700900556@c.us"),
            "status": "expired",
            "finishedAt": utcnow(),
            "lastError": "more than 120 s past its time",
        }
    )
    log_in(page, served)
    page.get_by_text("Spring sale").first.wait_for()
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d UTC", page.inner_text("#updated"))
    assert page.locator("#schedules td", has_text="(in 5 days)").count() == 1
    # The failed message's campaign by its name; session `sales` on the server that lists it.
    failed = page.locator("#notsent tbody tr", has_text="failed")
    assert failed.locator("td").nth(3).inner_text() == "Spring sale"
    sales = page.locator("#sessions tbody tr", has_text="sales")
    assert sales.locator("td").nth(1).inner_text() == "vps-2"

    # A campaign's not-sent messages are found by its name as well as by its id.
    assert page.locator("#notsent tbody tr").count() == 2
    page.fill("input[name=campaign]", "Spring sale")
    page.click("#filter button")
    wait_until(lambda: page.locator("#notsent tbody tr").count() == 1, 60, "the filter")
    assert "Spring sale" in page.inner_text("#notsent tbody tr")
    bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
    with httpx.Client(base_url=served, headers=bearer, timeout=30) as http:
        for asked, found in (("Spring sale", 1), (str(lived), 1), ("Autumn sale", 0)):
            body = http.get("/api/status", params={"campaign": asked}).json()
            assert len(body["notSent"]) == found, asked
        names = {m["campaignName"] for m in http.get("/api/status").json()["notSent"]}
        assert names == {"Spring sale", None}


def test_after_pause_the_page_shows_at_once_that_nothing_goes_out(
    page: Any, served: str, settings: Settings, store: Store
) -> None:
    lived_in(settings, store)
    page.clock.install()  # the page's own 5 s refresh never comes: only the action's can
    log_in(page, served)
    spring = page.locator(".campaign", has_text="Spring sale")
    spring.locator(".counts", has_text="eta").wait_for()
    # Ahead of the page's clock however long the log-in took, and before its next refresh.
    page.clock.pause_at(datetime.now(UTC) + seconds(4))
    spring.get_by_role("button", name="Pause").click()
    spring.locator(".status", has_text="paused").wait_for()
    counts = spring.locator(".counts").inner_text()
    assert "paused: nothing goes out until it is resumed" in counts and "eta" not in counts
    assert spring.get_by_role("button", name="Resume").is_visible()


def test_the_chart_spans_its_data_and_the_day_on_request(
    page: Any, served: str, store: Store
) -> None:
    now = utcnow()
    store.messages.collection.insert_many(
        [
            {
                **message(now - seconds(600), chat_id=f"4477009001{n:02d}"),
                "status": "sent",
                "sentAt": now - seconds(600 - n),
            }
            for n in range(2)
        ]
        + [
            {
                **message(now - seconds(3 * 3600), chat_id="447700900199"),
                "status": "failed",
                "finishedAt": now - seconds(3 * 3600),
            }
        ]
    )
    log_in(page, served)
    legend = page.locator("#chart .legend")
    legend.get_by_text("sent 2").wait_for()
    assert "failed 0" in legend.inner_text()  # 3 hours ago: not in the last hour
    assert page.inner_text("#chart h2") == "Messages per minute, last hour"
    # The chart spans the minutes of its data: the sends sit inside it, not at its right edge.
    width = float(page.get_attribute("#chart svg", "viewBox").split()[2])  # type: ignore[union-attr]
    bars = [
        float(x)
        for x in page.eval_on_selector_all(
            "#chart rect.sent", "bs => bs.map(b => b.getAttribute('x'))"
        )
    ]
    assert bars and max(bars) / width < 0.9 and width <= 61, (bars, width)

    page.get_by_role("button", name="24 hours").click()
    legend.get_by_text("failed 1").wait_for()
    assert page.inner_text("#chart h2") == "Messages per minute, last 24 hours"
    assert page.get_attribute("button[data-window='24h']", "aria-pressed") == "true"
    bearer = {"Authorization": f"Bearer {DASHBOARD_TOKEN}"}
    with httpx.Client(base_url=served, headers=bearer, timeout=30) as http:
        day = http.get("/api/status", params={"window": "24h"}).json()
        hour = http.get("/api/status").json()
        assert (day["window"], hour["window"]) == ("24h", "1h")
        assert sum(r["n"] for r in day["perMinute"]) == 3
        assert sum(r["n"] for r in hour["perMinute"]) == 2
        assert {"lateness", "pacingDelay"} <= hour.keys()
        odd = http.get("/api/status", params={"window": "7d"})
        assert odd.status_code == 400 and odd.json() == {"error": "window is one of 1h, 24h"}


def test_lateness_counts_from_the_planned_time_and_pacing_from_the_scheduled_one(
    page: Any, served: str, store: Store
) -> None:
    scheduled = utcnow() - seconds(10 * 3600)
    # (slotAt - scheduledAt, sentAt - slotAt) in seconds; None: sent by a version without slotAt.
    sends = [(0, 0.4), (30, 2), (90, 3), (900, 0.5), (4000, 45), (30000, 200), (None, 7)]
    docs = []
    for n, (paced, late) in enumerate(sends):
        slot = scheduled + seconds(paced or 0)
        doc = {
            **message(scheduled, chat_id=f"4477009002{n:02d}"),
            "status": "sent",
            "sentAt": slot + seconds(late),
        }
        if paced is not None:
            doc["slotAt"] = slot
        docs.append(doc)
    store.messages.collection.insert_many(docs)
    since = scheduled - seconds(60)
    lateness = {row["from"]: row["n"] for row in store.activity.lateness(since)}
    assert lateness == {0: 2, 1: 2, 5: 1, 30: 1, 60: 0, 120: 1}
    pacing = {row["from"]: row["n"] for row in store.activity.pacing_delay(since)}
    assert pacing == {0: 2, 60: 1, 600: 1, 1800: 1, 7200: 0, 21600: 1}, "only those with slotAt"

    log_in(page, served)
    page.get_by_role("button", name="24 hours").click()
    late = page.locator("#lateness")
    late.get_by_text("2 min or more").wait_for()
    assert late.locator("h2").inner_text() == (
        "How late messages went out (against their planned time), last 24 hours"
    )
    held = page.locator("#pacing")
    assert held.locator("h2").inner_text() == "How long pacing held them back, last 24 hours"
    rows = [
        (r.locator(".label").inner_text(), r.locator("span").last.inner_text())
        for r in held.locator(".row").all()
    ]
    assert rows == [
        ("0–60 s", "2"),
        ("60 s–10 min", "1"),
        ("10–30 min", "1"),
        ("30 min–2 h", "1"),
        ("2–6 h", "0"),
        ("6 h or more", "1"),
    ]


def test_a_test_message_shows_its_progress_until_it_is_sent(
    page: Any, served: str, store: Store, client: WahaClient, waha: WahaSimulator
) -> None:
    log_in(page, served)
    page.get_by_text("Send a test message").click()
    form = page.locator("#send-form")
    form.locator("input[name=to]").fill("12")
    form.locator("textarea[name=text]").fill("Hello from the dashboard")
    form.get_by_role("button", name="Send").click()
    page.locator("#send .problems li", has_text="to: '12' is not a phone number").wait_for()
    assert store.messages.collection.count_documents({}) == 0

    form.locator("input[name=to]").fill("+44 7700 900123")
    form.get_by_role("button", name="Send").click()
    result = page.locator("#send .result")
    result.get_by_text("waiting for a poller to see it").wait_for()
    assert page.locator("#send .problems").is_hidden()
    tick(store, client, 20)  # a poller's tick: the page shows the send
    page.locator("#send .result[data-status=sent]").wait_for()
    assert re.fullmatch(
        r"Message [0-9a-f]{24}: sent \d{4}-.* UTC \(\d+ s ago\)", result.inner_text()
    )
    assert [(m.chat_id, m.text) for m in waha.sent] == [
        ("447700900123@c.us", "Hello from the dashboard")
    ]


def test_a_campaign_from_a_csv_file_is_previewed_then_confirmed(
    page: Any, served: str, settings: Settings, store: Store, client: WahaClient
) -> None:
    campaigns = store.messages.collection.database[settings.campaigns_collection]
    log_in(page, served)
    page.get_by_text("New campaign from CSV").click()
    form = page.locator("#import-form")
    bad = b"phone,name\n447700900001,Ann\nnot a number,Bob\n"
    form.locator("input[type=file]").set_input_files(
        files=[{"name": "spring.csv", "mimeType": "text/csv", "buffer": bad}]
    )
    form.locator("input[name=name]").fill("Spring <b>sale</b>")
    form.locator("textarea[name=text]").fill("Hi {name}, 20% off this week")
    form.get_by_role("button", name="Preview").click()
    page.locator("#import .problems li", has_text="row 3: 'not a number'").wait_for()
    assert page.locator("#import .preview").is_hidden()

    good = b"phone,name\n447700900001,Ann\n447700900002,Bob\n"
    form.locator("input[type=file]").set_input_files(
        files=[{"name": "spring.csv", "mimeType": "text/csv", "buffer": good}]
    )
    form.get_by_role("button", name="Preview").click()
    preview = page.locator("#import .preview")
    preview.get_by_text("2 messages for campaign “Spring <b>sale</b>”").wait_for()
    assert preview.locator("td[data-label=session]").inner_text() == "default"
    assert preview.locator("td[data-label=messages]").inner_text() == "2"
    assert page.locator("#import .problems").is_hidden()
    assert campaigns.count_documents({}) == 0, "a preview writes nothing"
    assert store.messages.collection.count_documents({}) == 0

    preview.get_by_role("button", name="Confirm").click()
    page.locator("#import .result", has_text="written: 2 of its 2 messages new").wait_for()
    assert preview.is_hidden()
    assert campaigns.count_documents({"name": "Spring <b>sale</b>"}) == 1
    texts = sorted(d["content"] for d in store.messages.collection.find())
    assert texts == ["Hi Ann, 20% off this week", "Hi Bob, 20% off this week"]
    # Once a poller has seen its messages (one sent, the next held by pacing), it is running.
    tick(store, client, 20, pacing=Pacing(600, 600))
    page.locator(".campaign", has_text="Spring <b>sale</b>").wait_for()
    assert page.locator(".campaign b").count() == 0


def test_screenshots_of_one_moment(
    browser: Any, settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    """README's pictures: a paced campaign that reached its session's daily cap, one message
    expired, taken once the poller has nothing to do until tomorrow, so that every count on
    the page is of that one moment."""
    db = store.messages.collection.database
    campaigns, beats = db[settings.campaigns_collection], db[settings.heartbeats_collection]
    campaign = campaigns.insert_one({"name": "Black Friday", "status": "running"}).inserted_id
    now, cap = utcnow(), 6
    store.messages.collection.insert_many(
        [
            message(
                now - seconds(900 if n == 3 else 0),  # seen too late: expired
                chat_id=f"4477{n:08d}@c.us",
                campaignId=campaign,
                content=f"Black Friday: 30% off today only ({n})",
            )
            for n in range(12)
        ]
    )
    port = free_port()
    env = environment(
        settings,
        HEALTH_PORT=str(port),
        DASHBOARD_TOKEN=DASHBOARD_TOKEN,
        PACING_MIN_SECONDS="1",
        PACING_MAX_SECONDS="4",
        DAILY_CAP=str(cap),
        POLL_INTERVAL_SECONDS="2",
        HEARTBEAT_SECONDS="1",
    )
    base = f"http://127.0.0.1:{port}"

    def idle() -> bool:
        """The cap reached, each end counted in the campaign, and a tick completed since."""
        ended = list(
            store.messages.collection.find(
                {"status": {"$in": ["sent", "expired"]}}, {"sentAt": 1, "finishedAt": 1}
            )
        )
        stats = (campaigns.find_one({"_id": campaign}) or {}).get("stats") or {}
        beat = beats.find_one() or {}
        return (
            len(ended) == cap + 1
            and (stats.get("sent"), stats.get("expired")) == (cap, 1)
            and beat.get("lastTickAt") is not None
            and all(beat["lastTickAt"] > (d.get("sentAt") or d["finishedAt"]) for d in ended)
        )

    with replicas([env], tmp_path):
        wait_until(lambda: _healthy(base), 120, "poller run serves its dashboard")
        wait_until(idle, 120, "the daily cap reached and counted")
        assert len(waha.sent) == cap
        for viewport, path, name in (
            ({"width": 1280, "height": 900}, SCREENSHOT, "dashboard.png"),
            (PHONE, PHONE_SCREENSHOT, "dashboard-phone.png"),
        ):
            with opened(browser, viewport) as shown:
                log_in(shown, base)
                shown.locator(".campaign", has_text="Black Friday").wait_for()
                shown.locator("#chart .legend", has_text=f"sent {cap}").wait_for()
                assert campaign_counts(shown, "Black Friday")["sent"] == cap
                assert "expired 1" in shown.inner_text("#chart .legend")
                shown.locator("#sessions td", has_text=f"daily cap of {cap} reached").wait_for()
                shown.locator("#notsent td", has_text="expired").first.wait_for()
                shown.screenshot(path=path or str(tmp_path / name), full_page=True)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False
