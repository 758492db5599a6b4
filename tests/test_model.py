"""A model of everything around the poller, interleaved at random by hypothesis on a fake clock:
the web app (messages and campaigns written, paused, resumed, cancelled, deleted, rescheduled,
marked sent; opt-outs), two replicas ticking (one may tick in the middle of the other's tick),
WAHA's faults (500s, lost replies, answers later than the client waits, a hung session list, a
session that stops) and replicas that crash (stopped, or killed with a send in flight) and come
back with an empty memory. After every step it checks what the README promises (Data contract,
What a tick does, Outcomes, Guarantees); at the end of each example every fault ends, paused
campaigns resume, time runs past every plan, and every message and campaign must have ended.

Only the public interface is used: `tick` and its arguments, `Store`, the collections as the web
app sees them and the fields the data contract names, and the WAHA simulator. Each example has a
database and a simulator of its own. `POLLER_MODEL_EXAMPLES` (25) and `POLLER_MODEL_STEPS` (25)
run it longer, as a release check does: `POLLER_MODEL_EXAMPLES=300 .venv/bin/pytest
tests/test_model.py`; `POLLER_MODEL_TIMEOUT` (600 s) bounds the test, shrinking included.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from bson import ObjectId
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pymongo import MongoClient
from support import API_KEY, wait_until

from poller.breaker import Breakers
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import Request, SentMessage, WahaSimulator, engine_error
from poller.tick import tick
from poller.waha import WahaClient

EXAMPLES = int(os.environ.get("POLLER_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("POLLER_MODEL_STEPS", "25"))

START = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SESSIONS = ("s1", "s2")
CHATS = ("447700900101@c.us", "447700900102@c.us", "447700900103@c.us")
MAX_MESSAGES = 6  # per example: SecantusDB takes 10-30 ms a write
MAX_CAMPAIGNS = 2
# When a new or rescheduled message is due, in seconds from now: now, inside the lookback
# window, past it, soon, later.
DUE = (0, -30, -100, -200, 20, 400)
LOOKBACK = 120.0  # the defaults, spelled out: the checks below count with them
LEASE = 120.0
RETRY = 30.0
PATIENT = 10.0  # s: no answer of a healthy simulator takes that long, even on a busy machine
IMPATIENT = 0.3  # s: the WAHA client's timeout while WAHA misbehaves...
SLOW = 1.0  # s: ...and how late a slow WAHA answers
QUIET_FOR = timedelta(minutes=10)  # at the end: nothing changes for this long (5-min recounts)

FINAL = ("sent", "failed", "expired", "unknown", "cancelled")
IN_FLIGHT = ("claimed", "sending")
STATUSES = (*FINAL, *IN_FLIGHT, "pending", "retry")
COMPLETED = ("completed", "completed_with_failures")
COUNTED = ("total", "sent", "failed", "expired", "unknown", "cancelled")

# What the web app does to a message, and what it writes for it (None: removes the document).
CHANGES: dict[str, dict[str, Any] | None] = {
    "isDeleted: true": {"isDeleted": True},
    "isDeleted: 1": {"isDeleted": 1},
    'isDeleted: "true"': {"isDeleted": "true"},
    "removed": None,
    "isSent: true": {"isSent": True},
    "isSent: 1": {"isSent": 1},
    'isSent: "true"': {"isSent": "true"},
}
FAULTS = (
    "answers 500 to a chat",
    "loses its next reply to a chat",
    "answers a session's sends late",
    "answers every send late",
    "lists its sessions late",
    "stops a session",
)
# What the web app does to a campaign while a replica ticks (see `replica_ticks`).
DURING_A_TICK = (None, "paused", "running", "cancelled", "paused, then running")
# Something else that happens while a replica ticks.
MEANWHILE = (
    "the web app deletes a message",
    "the web app marks a message sent",
    "a chat opts out",
    "the other replica ticks",
)


def yes(value: Any) -> bool:
    """`isSent` / `isDeleted` as the data contract reads them: true, 1 or "true"."""
    return value is True or value == "true" or (type(value) in (int, float) and value == 1)


def ended(doc: dict[str, Any]) -> bool:
    """The message can no longer be sent: a final status, or done by the web app's flags."""
    return doc.get("status") in FINAL or yes(doc.get("isSent")) or yes(doc.get("isDeleted"))


def recount(docs: list[dict[str, Any]], web_sent_as_sent: bool) -> dict[str, int]:
    """A campaign's stats from its messages, as README's `campaigns` defines them: `total`
    leaves out deleted messages, `failed` includes `unknown`. The README does not say whether a
    message the web app marked sent itself counts as sent or not at all: either is accepted."""
    stats = dict.fromkeys(COUNTED, 0)
    for doc in docs:
        if yes(doc.get("isDeleted")):
            continue
        status = doc.get("status")
        if status not in FINAL and yes(doc.get("isSent")):
            if not web_sent_as_sent:
                continue
            status = "sent"
        stats["total"] += 1
        if status in FINAL:
            stats[str(status)] += 1
    stats["failed"] += stats["unknown"]
    return stats


@dataclass
class Message:
    """What the model knows of a message: what the web app wrote, and what the poller planned."""

    id: ObjectId
    text: str  # unique: WhatsApp's copies are told apart by it
    session: str
    chat: str
    campaign: ObjectId | None
    scheduled: datetime  # the latest scheduledAt
    seen_in_time: bool = False  # a tick ran while it was due and inside the lookback window
    planned: datetime | None = None  # the latest plannedAt seen
    taken_over: bool = False  # a killed replica held it: it may go out up to a lease later
    deleted: int | None = None  # when (request sequence) the web app deleted it
    deleted_loosely_in: int | None = None  # the tick in which that deletion raced its send
    removed: bool = False
    web_sent: bool = False


@dataclass
class Campaign:
    id: ObjectId
    status: str | None = "running"  # as last written, by the web app or the poller
    resume_pending: bool = False  # resumed, and no tick has finished since
    resumed: datetime | None = None  # when the first tick after its last resume ran
    dirty: bool = False  # the web app changed its messages since the poller last recounted it
    dirty_since: Any = None  # its recountedAt when that last happened
    final_stats: dict[str, int] | None = None  # its stats when it completed
    changed_in: int | None = None  # the tick during which the web app last set its status


@dataclass
class Attempt:
    """A sendText request as WAHA got it, with what the model said of it at that moment."""

    seq: int
    text: str
    send_id: Any
    at: datetime
    deadline: datetime | None  # None: not a message of the model
    why_not: str | None  # why it must not go out, if it must not
    could_deliver: bool  # the session was WORKING and the chat not answered with a 500
    delivers_late: bool  # WAHA was slow: it delivers after the client gave up


@dataclass
class Replica:
    settings: Settings
    store: Store
    breakers: Breakers
    patient: WahaClient
    impatient: WahaClient

    def close(self) -> None:
        self.store.close()
        self.patient.close()
        self.impatient.close()


@dataclass(frozen=True)
class Env:
    """What the examples of one test run share."""

    mongo_uri: str
    db_prefix: str
    make_settings: Callable[..., Settings]
    validator: Callable[[Request], str | None] | None


class PollerModel(RuleBasedStateMachine):
    """The web app, two replicas, WAHA and the clock, as rules; what the README promises, as
    checks. After every step (`promises_hold`): no chat got a message twice; each went out no
    later than the lookback rule allows (LOOKBACK past its latest scheduledAt or, once seen in
    time, its plannedAt or its campaign's resume; a lease more for a killed replica's claim),
    and not once it was deleted, its campaign paused or cancelled, its chat opted out, or the
    web app had marked it sent; only a killed replica's claims are `claimed` or `sending`, each
    with a lease live when it died; status, isPicked, lastError and sentAt as the data contract
    has them; `sent` means WhatsApp has it, and one WhatsApp has is never `expired` or
    `cancelled`; a campaign's stats equal a recount of its messages (unless the web app changed
    them since the last recount), it completes only once all of them ended, and its stats then
    add up and stay. After every tick (`_plans_kept`): a message the poller has seen that still
    waits has a plannedAt, unless its campaign is paused. At the end (`teardown`): everything
    ends."""

    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.lock = threading.Lock()  # the simulator's threads log requests while a tick runs
        self.seq = 0  # orders requests and web app deletions
        self.ticking: list[int] = []  # the ticks running, a nested one last
        self.ticks = 0
        self.why_not_at_start: dict[int, dict[str, str]] = {}
        self.attempts: list[Attempt] = []
        self.hook: Callable[[Request | None], None] | None = None
        self.hook_path: str | None = None
        self.hook_error: BaseException | None = None
        self.messages: list[Message] = []
        self.by_text: dict[str, Message] = {}
        self.campaigns: list[Campaign] = []
        self.opted_out: set[tuple[str, str]] = set()
        self.killed: dict[str, datetime] = {}  # owner -> when it was killed
        self.name = uuid.uuid4().hex[:8]
        self.db_name = f"{self.env.db_prefix}_{self.name}"
        self.waha = WahaSimulator(
            api_key=API_KEY,
            sessions=dict.fromkeys(SESSIONS, "WORKING"),
            not_working_wait=0.2,
            stall=SLOW,
            validator=self._saw,
        ).start()
        self.replicas = [self._start(k) for k in range(2)]
        web = self.replicas[0].settings
        self.web = Store(MongoClient(self.env.mongo_uri, tz_aware=True), web)  # the web app

    # -- the web app --------------------------------------------------------------------------

    @initialize(
        count=st.integers(2, 3),
        due=st.sampled_from((0, -30)),
        session=st.sampled_from(SESSIONS),
    )
    def web_app_writes_campaign(self, count: int, due: int, session: str) -> None:
        """Each example starts with a campaign of a few messages to one session, due about now."""
        self.web_app_creates_campaign()
        self.web_app_schedules_messages(count, due, session, 0, 0)

    @precondition(lambda self: len(self.campaigns) < MAX_CAMPAIGNS)
    @rule()
    def web_app_creates_campaign(self) -> None:
        doc = {"name": f"campaign {len(self.campaigns)}", "status": "running"}
        self.campaigns.append(Campaign(self.web.campaigns.collection.insert_one(doc).inserted_id))

    @precondition(lambda self: len(self.messages) < MAX_MESSAGES)
    @rule(
        count=st.integers(1, 3),
        due=st.sampled_from(DUE),
        session=st.sampled_from(SESSIONS),
        chat=st.integers(0, len(CHATS) - 1),
        campaign=st.none() | st.integers(0, MAX_CAMPAIGNS - 1),
    )
    def web_app_schedules_messages(
        self, count: int, due: int, session: str, chat: int, campaign: int | None
    ) -> None:
        """One message, or a few to different chats at once (as a campaign is written)."""
        c = None
        if campaign is not None and self.campaigns:
            c = self.campaigns[campaign % len(self.campaigns)]
            self._dirty(c)
        at = self.now + timedelta(seconds=due)
        for k in range(min(count, MAX_MESSAGES - len(self.messages))):
            text = f"{self.name} message {len(self.messages)}"
            to = CHATS[(chat + k) % len(CHATS)]
            doc: dict[str, Any] = {
                "scheduledAt": at,
                "chatId": to,
                "content": text,
                "session": session,
                "isSent": False,
                "isPicked": False,
                "isDeleted": False,
            }
            if c is not None:
                doc["campaignId"] = c.id
            inserted = self.web.messages.collection.insert_one(doc).inserted_id
            m = Message(inserted, text, session, to, c.id if c else None, at)
            self.messages.append(m)
            self.by_text[text] = m

    @precondition(lambda self: self.campaigns)
    @rule(
        campaign=st.integers(0, MAX_CAMPAIGNS - 1),
        status=st.sampled_from(["paused", "running", "cancelled"]),
    )
    def web_app_sets_campaign_status(self, campaign: int, status: str) -> None:
        """As the dashboard does: pause one not paused, resume a paused one, cancel; only while
        it is open."""
        c = self.campaigns[campaign % len(self.campaigns)]
        closed = [*COMPLETED, "cancelled"] + (["paused"] if status == "paused" else [])
        query: dict[str, Any] = {"_id": c.id, "completedAt": {"$exists": False}}
        query["status"] = "paused" if status == "running" else {"$nin": closed}
        change = {"$set": {"status": status, "statusChangedAt": self.now}}
        if self.web.campaigns.collection.update_one(query, change).matched_count:
            c.status = status
            c.resume_pending = c.resume_pending or status == "running"
            c.changed_in = self.ticking[-1] if self.ticking else None

    @precondition(lambda self: self._live())
    @rule(message=st.integers(0, MAX_MESSAGES - 1), change=st.sampled_from(list(CHANGES)))
    def web_app_changes_message(self, message: int, change: str) -> None:
        self._change(self._message(message), change)

    @precondition(lambda self: self._live())
    @rule(message=st.integers(0, MAX_MESSAGES - 1), due=st.sampled_from(DUE))
    def web_app_reschedules_message(self, message: int, due: int) -> None:
        m = self._message(message)
        m.scheduled = self.now + timedelta(seconds=due)
        self.web.messages.collection.update_one(
            {"_id": m.id}, {"$set": {"scheduledAt": m.scheduled}}
        )

    @rule(session=st.sampled_from(SESSIONS), chat=st.integers(0, len(CHATS) - 1), out=st.booleans())
    def chat_opts(self, session: str, chat: int, out: bool) -> None:
        """The web app writes the opt-out (or deletes it: the chat opted in again)."""
        self._opt(session, CHATS[chat], out)

    # -- the replicas -------------------------------------------------------------------------

    @rule(
        replica=st.sampled_from([0, 1]),
        campaign_status=st.sampled_from(DURING_A_TICK),
        meanwhile=st.sampled_from([None, *MEANWHILE]),
    )
    def replica_ticks(
        self, replica: int, campaign_status: str | None, meanwhile: str | None
    ) -> None:
        """The replica ticks. While it is sending (at its first request for a message, before
        WAHA answers it; after the tick if it makes none), the web app may set the status of a
        campaign (`campaign_status`, as `web_app_sets_campaign_status` does; "paused, then
        running": it resumes it right after the tick), and something else may happen
        (`meanwhile`), to the latest campaign and message written: those most likely in the
        tick's hands."""
        first, _, then = (campaign_status or "").partition(", then ")
        # The other replica's tick first: the requests this tick makes for its other sessions
        # meanwhile are taken for the other's, which must then have started from the same state.
        order = (meanwhile, first) if meanwhile == "the other replica ticks" else (first, meanwhile)
        during = [self._meanwhile(what, replica) for what in order if what]
        after = [self._meanwhile(then, replica)] if then else []
        if meanwhile == "the other replica ticks" and self._slow():
            # Nested inside a request that the client gives up on, two ticks would overlap.
            after.insert(0, during.pop(0))

        def meanwhile_do(request: Request | None) -> None:
            for act in during:
                act(request)

        with self.lock:
            self.hook, self.hook_path = (meanwhile_do if during else None), None
        self._tick(self.replicas[replica])
        with self.lock:
            left, self.hook = self.hook, None
        if left is not None:
            left(None)
        for act in after:
            act(None)
        self._raise_hook_error()

    @rule(replica=st.sampled_from([0, 1]), how=st.sampled_from(["stopped", "killed"]))
    def replica_crashes(self, replica: int, how: str) -> None:
        """The replica ticks and goes down at its first send: stopped (SIGTERM: it finishes the
        message in flight and gives back the rest), or killed (its MongoDB connection dies
        while WAHA delivers: its claims stay behind). It comes back with an empty memory."""
        r = self.replicas[replica]
        stop = threading.Event()
        with self.lock:
            if how == "stopped":
                self.hook, self.hook_path = (lambda request: stop.set()), None
            else:
                self.hook, self.hook_path = (lambda request: r.store.close()), "/api/sendText"
        try:
            self._tick(r, stop)
        except Exception:
            if how != "killed" or self.hook is not None:
                raise  # not what losing MongoDB half-way does to a tick: a failure of its own
        with self.lock:
            self.hook = None
        self._raise_hook_error()
        r.close()
        if how == "killed":
            self.killed[r.store.owner] = self.now
            held = {"pickedBy": r.store.owner, "status": {"$in": list(IN_FLIGHT)}}
            for doc in self.web.messages.collection.find(held, {"content": 1}):
                self.by_text[doc["content"]].taken_over = True
            for c in self.campaigns:
                self._dirty(c)  # its tick never rolled its campaigns up
        self.replicas[replica] = self._start(replica)

    @rule(seconds=st.integers(1, 400))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # -- WAHA -------------------------------------------------------------------------------------

    @rule(fault=st.sampled_from(FAULTS), which=st.integers(0, len(CHATS) - 1))
    def waha_misbehaves(self, fault: str, which: int) -> None:
        chat, session = CHATS[which], SESSIONS[which % len(SESSIONS)]
        if fault == "answers 500 to a chat":
            self._sends_on_time()  # a late send must not meet the 500 meant for a later one
            self.waha.scripted[chat] = engine_error("Connection Closed")
        elif fault == "loses its next reply to a chat":
            self.waha.stall_after_send.add(chat)  # delivered, answered after the client gave up
        elif fault == "answers a session's sends late":
            self.waha.slow_sessions[session] = SLOW  # delivered, answered too late
        elif fault == "answers every send late":
            self.waha.scripted.clear()
            self.waha.latency = SLOW  # answered too late, delivered after that
        elif fault == "lists its sessions late":
            self.waha.listing_delay = SLOW
        else:
            self.waha.sessions[session] = "SCAN_QR_CODE"

    @rule()
    def waha_works_again(self) -> None:
        self._sends_on_time()
        self.waha.scripted.clear()
        self.waha.stall_after_send.clear()
        self.waha.slow_sessions.clear()
        self.waha.listing_delay = 0.0
        self.waha.sessions.update(dict.fromkeys(SESSIONS, "WORKING"))

    # -- what must hold after every step ------------------------------------------------------

    @invariant()
    def promises_hold(self) -> None:
        docs = list(self.web.messages.collection.find())
        delivered = list(self.waha.sent)
        copies = Counter(s.text for s in delivered)

        twice = sorted(text for text, n in copies.items() if n > 1)
        assert not twice, f"WhatsApp got these more than once: {twice}"

        for sent in delivered:
            attempt = self._attempt_of(sent)
            assert attempt is not None, f"{sent.text!r} was delivered without a request for it"
            assert attempt.deadline is not None and attempt.at <= attempt.deadline, (
                f"{sent.text!r} went out at {attempt.at:%H:%M:%S}, after {attempt.deadline}, the "
                f"latest the lookback rule allows ({self._late_story(attempt.text)})"
            )
            assert attempt.why_not is None, f"{sent.text!r} went out though {attempt.why_not}"

        for doc in docs:
            text, status = doc.get("content"), doc.get("status")
            m = self.by_text[text]
            if isinstance(doc.get("plannedAt"), datetime):
                m.planned = max(m.planned or doc["plannedAt"], doc["plannedAt"])
            assert status is None or status in STATUSES, f"{text!r}: status {status!r}"
            if status in IN_FLIGHT:
                owner = doc.get("pickedBy")
                assert owner in self.killed, (
                    f"{text!r} is {status} by {owner}, which is not in a tick and did not die"
                )
                lease = doc.get("leaseUntil")
                assert isinstance(lease, datetime) and lease > self.killed[owner], (
                    f"{text!r} was {status} without a live lease ({lease}) when its poller died"
                )
                assert doc.get("isPicked") is True, f"{text!r} is {status} but not isPicked"
            else:
                assert "leaseUntil" not in doc, f"{text!r} is {status} with a lease left"
            if status in ("pending", "retry") and not ended(doc):  # the web app's are done
                assert doc.get("isPicked") is False, f"{text!r} waits ({status}) but isPicked"
            if status in FINAL:
                assert doc.get("isPicked") is True, f"{text!r} is {status} but not isPicked"
            if status in FINAL and status != "sent":
                why = doc.get("lastError")
                assert isinstance(why, str) and why.strip(), f"{text!r} is {status}, no lastError"
            if status == "sent":
                assert copies[text] == 1, f"{text!r} is sent but WhatsApp never got it"
                assert isinstance(doc.get("sentAt"), datetime), f"{text!r} is sent, no sentAt"
            if status in ("expired", "cancelled"):
                assert copies[text] == 0, (
                    f"{text!r} reached WhatsApp but is {status} ({doc.get('lastError')}): a "
                    "message that may have reached WhatsApp ends unknown"
                )

        campaigns = {doc["_id"]: doc for doc in self.web.campaigns.collection.find()}
        for c in self.campaigns:
            doc = campaigns[c.id]
            if c.dirty and doc.get("recountedAt") != c.dirty_since:
                c.dirty = False  # recounted since the web app changed its messages
            c.status = doc.get("status")  # the poller writes it too, when the campaign completes
            if "stats" not in doc:
                continue  # the poller never worked on it
            mine = [d for d in docs if d.get("campaignId") == c.id]
            stats = {k: doc["stats"].get(k) for k in COUNTED}
            done = "completedAt" in doc or doc.get("status") in COMPLETED
            completing = done and c.final_stats is None  # it completed in this step
            if done:
                assert doc.get("status") in (*COMPLETED, "cancelled"), (
                    f"campaign {c.id} completed with status {doc.get('status')!r}"
                )
                assert isinstance(doc.get("completedAt"), datetime), (
                    f"campaign {c.id} is {doc.get('status')} without completedAt"
                )
                if completing:
                    still = [d["content"] for d in mine if not ended(d)]
                    assert not still, f"campaign {c.id} completed while {still} can still go out"
                    c.final_stats = stats
                assert stats == c.final_stats, (
                    f"campaign {c.id} completed with {c.final_stats}, then its stats became {stats}"
                )
                ended_stats = stats["sent"] + stats["failed"] + stats["expired"]
                assert ended_stats + stats["cancelled"] == stats["total"], (
                    f"campaign {c.id} completed with stats that do not add up: {stats}"
                )
                if doc["status"] in COMPLETED:
                    assert (doc["status"] == "completed") == (stats["sent"] == stats["total"]), (
                        f"campaign {c.id} is {doc['status']} with {stats}"
                    )
            # Once completed, its stats stay as they were then, whatever happens to its messages.
            if not c.dirty and (not done or completing):
                expected = [recount(mine, True), recount(mine, False)]
                assert stats in expected, (
                    f"campaign {c.id} has stats {stats}; its messages count {expected[0]}"
                    f"{'' if expected[0] == expected[1] else f' or {expected[1]}'}: "
                    f"{self._describe(mine)}"
                )

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # no step failed: the end must be reached
                self._everything_ends()
        finally:
            with self.lock:
                self.hook = None
            self._sends_on_time(check=sys.exc_info()[0] is None)
            self.waha.stop()
            for replica in self.replicas:
                replica.close()
            self.web.client.drop_database(self.db_name)
            self.web.close()
        assert self.waha.violations == [], "requests that break WAHA's OpenAPI spec"

    def _everything_ends(self) -> None:
        """Faults end, paused campaigns resume, and the replicas tick in turn, the clock moving to
        the next planned moment whenever nothing changes, until nothing has changed for
        QUIET_FOR: then every message has ended, and so has every campaign of them."""
        self.waha_works_again()
        for k, c in enumerate(self.campaigns):
            if c.status == "paused":
                self.web_app_sets_campaign_status(k, "running")
        last: Any = None
        quiet = timedelta()
        for turn in range(200):
            self._tick(self.replicas[turn % 2])
            self.promises_hold()
            picture = self._picture()
            if picture != last:
                last, quiet = picture, timedelta()
                continue
            if quiet >= QUIET_FOR:
                break
            # To the next planned moment; after the breakers' cool-down, in ever longer steps.
            step = max(_s(RETRY + 1), quiet)
            upcoming = self._next_moment()
            if upcoming is not None:
                step = min(step, upcoming - self.now)
            self.now += step
            quiet += step
        docs = list(self.web.messages.collection.find())
        still = [d for d in docs if not ended(d)]
        assert not still, (
            f"after every fault ended and time ran {QUIET_FOR} past the last change, these "
            f"never ended: {self._describe(still)}"
        )
        for c in self.campaigns:
            doc = self.web.campaigns.collection.find_one({"_id": c.id})
            assert doc is not None
            mine = [d for d in docs if d.get("campaignId") == c.id]
            if "stats" not in doc or recount(mine, False)["total"] == 0:
                continue  # never worked on, or nothing left in it to complete
            assert "completedAt" in doc, (
                f"campaign {c.id} ({doc.get('status')}, stats {doc.get('stats')}) never "
                f"completed, though all its messages ended: {self._describe(mine)}"
            )

    # -- helpers ----------------------------------------------------------------------------------

    def _start(self, k: int) -> Replica:
        settings = self.env.make_settings(
            mongodb_db=self.db_name,
            waha_url=self.waha.url,
            waha_timeout_seconds=PATIENT,
            lookback_seconds=LOOKBACK,
            lease_seconds=LEASE,
            retry_seconds=RETRY,
            instance_id=f"replica{k}-{uuid.uuid4().hex[:4]}",
        )
        store = Store.connect(settings)
        store.ensure_indexes()
        return Replica(
            settings,
            store,
            Breakers(timedelta(seconds=settings.retry_seconds)),
            WahaClient(self.waha.url, API_KEY, PATIENT),
            WahaClient(self.waha.url, API_KEY, IMPATIENT),
        )

    def _slow(self) -> bool:
        """WAHA misbehaves in a way that makes it answer later than the client waits."""
        waha = self.waha
        return bool(
            waha.latency or waha.slow_sessions or waha.stall_after_send or waha.listing_delay
        )

    def _tick(self, r: Replica, stop: threading.Event | None = None) -> None:
        slow = self._slow()
        with self.lock:
            self.ticks += 1
            number = self.ticks
            self.why_not_at_start[number] = self._why_not_now()
            self.ticking.append(number)
        for m in self.messages:
            if m.scheduled - timedelta(seconds=30) <= self.now <= m.scheduled + _s(LOOKBACK):
                m.seen_in_time = True
        resumed = [c for c in self.campaigns if c.resume_pending]
        for c in resumed:
            c.resumed = self.now
        paused = {c.id for c in self.campaigns if c.status == "paused"}
        try:
            tick(
                r.store,
                r.impatient if slow else r.patient,
                r.settings.batch_size,
                clock=lambda: self.now,
                stop=stop,
                breakers=r.breakers,
                pacing=Pacing.from_settings(r.settings),
            )
        finally:
            with self.lock:
                self.ticking.remove(number)
        for c in resumed:  # a resume during the tick waits for the next one
            c.resume_pending = False
        if not self.ticking:  # not nested in another tick, which may still hold claims
            self._plans_kept(number, paused)

    def _plans_kept(self, number: int, paused: set[ObjectId]) -> None:
        """After a tick, every message the poller has seen (it has a `lane`) and that still
        waits has a `plannedAt` (data contract), unless its campaign is paused: paused when the
        tick started, or its status changed during the tick (the next tick acts on that)."""
        waiting = {"status": {"$in": [None, "pending", "retry"]}, "lane": {"$type": "string"}}
        stuck = []
        for doc in self.web.messages.collection.find({**waiting, "plannedAt": None}):
            c = self._campaign(doc.get("campaignId"))
            if not ended(doc) and (c is None or (c.id not in paused and c.changed_in != number)):
                stuck.append(doc)
        assert not stuck, (
            f"after a tick, these wait out of the plan though their campaign is not paused (or "
            f"they have none): no tick will send or settle them: {self._describe(stuck)}"
        )

    def _why_not_now(self) -> dict[str, str]:
        """Each message that must not go out in a tick starting now, and why."""
        found = {}
        for m in self.messages:
            c = self._campaign(m.campaign)
            if c is not None and c.status in ("paused", "cancelled"):
                found[m.text] = f"its campaign was {c.status} before the tick"
            elif (m.session, m.chat) in self.opted_out:
                found[m.text] = "its chat had opted out before the tick"
            elif m.web_sent:
                found[m.text] = "the web app had marked it sent before the tick"
        return found

    def _saw(self, request: Request) -> str | None:
        """The simulator's validator: every request WAHA gets, in the simulator's thread."""
        hook = None
        with self.lock:
            self.seq += 1
            if request.path == "/api/sendText":
                self.attempts.append(self._attempt(request, self.seq))
            if (
                self.hook is not None
                and request.path != "/api/sessions"
                and self.hook_path in (None, request.path)
            ):
                hook, self.hook = self.hook, None
        if hook is not None:
            try:
                hook(request)
            except BaseException as exc:  # raised in the test's thread after the tick
                self.hook_error = exc
        return self.env.validator(request) if self.env.validator else None

    def _attempt(self, request: Request, seq: int) -> Attempt:
        body = request.json() or {}
        text, session = body.get("text"), body.get("session")
        m = self.by_text.get(text) if isinstance(text, str) else None
        number = self.ticking[-1] if self.ticking else -1
        why_not = self.why_not_at_start.get(number, {}).get(str(text))
        if m is not None and m.deleted is not None and m.deleted < seq:
            if m.deleted_loosely_in != number:
                why_not = "the web app had deleted it before this request"
        return Attempt(
            seq,
            str(text),
            body.get("id"),
            self.now,
            self._deadline(m) if m is not None else None,
            why_not,
            self.waha.sessions.get(str(session)) == "WORKING"
            and body.get("chatId") not in self.waha.scripted,
            bool(self.waha.latency),
        )

    def _deadline(self, m: Message) -> datetime:
        """The latest a message may go out: LOOKBACK past its scheduledAt, or, once the poller
        saw it in time, past its plannedAt or its campaign's resume (plans move it later); a
        lease more for a claim of a poller that died."""
        base = m.scheduled
        c = self._campaign(m.campaign)
        if m.seen_in_time:
            base = max(t for t in (base, m.planned, c.resumed if c else None) if t is not None)
        return base + _s(LOOKBACK + (LEASE if m.taken_over else 0))

    def _attempt_of(self, sent: SentMessage) -> Attempt | None:
        """The request that delivered a message: the first that could, under its id."""
        with self.lock:
            attempts = list(self.attempts)
        for a in attempts:
            if a.text == sent.text and a.could_deliver and sent.id.endswith(f"_{a.send_id}"):
                return a
        return None

    def _sends_on_time(self, check: bool = True) -> None:
        """Turn WAHA's slow sends off, and wait until those it got meanwhile are delivered."""
        self.waha.latency = 0.0
        with self.lock:
            late = [a for a in self.attempts if a.delivers_late and a.could_deliver]
        if check:
            wait_until(
                lambda: all(
                    any(s.id.endswith(f"_{a.send_id}") for s in list(self.waha.sent)) for a in late
                ),
                what="WAHA delivers the sends it answered late",
            )

    def _meanwhile(self, what: str, replica: int) -> Callable[[Request | None], None]:
        """What happens during a tick (see `replica_ticks`): a campaign status, or one of
        MEANWHILE."""

        def act(request: Request | None) -> None:
            live = self._live()
            m = live[-1] if live else None
            if what in ("paused", "running", "cancelled"):
                ids = [x.campaign for x in live if x.campaign is not None]
                c = self._campaign(ids[-1]) if ids else self.campaigns[-1]
                assert c is not None
                self.web_app_sets_campaign_status(self.campaigns.index(c), what)
            elif what == "the other replica ticks":
                self._tick(self.replicas[1 - replica])
            elif m is not None and what == "a chat opts out":
                self._opt(m.session, m.chat, True)
            elif m is not None:
                change = "isDeleted: true" if what.endswith("deletes a message") else "isSent: 1"
                loose = request is not None and _session_of(request) != m.session
                self._change(m, change, loosely=loose)

        return act

    def _change(self, m: Message, change: str, loosely: bool = False) -> None:
        fields = CHANGES[change]
        if fields is None:
            self.web.messages.collection.delete_one({"_id": m.id})
            m.removed = True
        else:
            self.web.messages.collection.update_one({"_id": m.id}, {"$set": fields})
        if fields is None or "isDeleted" in fields:
            with self.lock:
                self.seq += 1
                if m.deleted is None:
                    m.deleted = self.seq
                    m.deleted_loosely_in = self.ticking[-1] if loosely and self.ticking else None
        else:
            m.web_sent = True
        c = self._campaign(m.campaign)
        if c is not None:
            self._dirty(c)

    def _opt(self, session: str, chat: str, out: bool) -> None:
        optouts = self.web.optouts.collection
        key = f"{session}:{chat}"
        if out:
            doc = {"session": session, "chatId": chat, "at": self.now}
            optouts.replace_one({"_id": key}, doc, upsert=True)
            self.opted_out.add((session, chat))
        else:
            optouts.delete_one({"_id": key})
            self.opted_out.discard((session, chat))

    def _dirty(self, c: Campaign) -> None:
        """The web app changed the campaign's messages: its stats are behind until the poller
        recounts it (its recountedAt changes)."""
        doc = self.web.campaigns.collection.find_one({"_id": c.id}, {"recountedAt": 1})
        c.dirty, c.dirty_since = True, (doc or {}).get("recountedAt")

    def _raise_hook_error(self) -> None:
        error, self.hook_error = self.hook_error, None
        if error is not None:
            raise error

    def _live(self) -> list[Message]:
        return [m for m in self.messages if not m.removed]

    def _message(self, k: int) -> Message:
        live = self._live()
        return live[k % len(live)]

    def _campaign(self, campaign_id: ObjectId | None) -> Campaign | None:
        return next((c for c in self.campaigns if c.id == campaign_id), None)

    def _picture(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The messages and campaigns, less what every recount rewrites."""
        messages = list(self.web.messages.collection.find().sort("_id"))
        campaigns = list(
            self.web.campaigns.collection.find({}, {"recountedAt": 0, "eta": 0}).sort("_id")
        )
        return messages, campaigns

    def _next_moment(self) -> datetime | None:
        """The next time a waiting message is scheduled, planned, retried or its lease ends."""
        later = [
            doc[name]
            for doc in self.web.messages.collection.find()
            if not ended(doc)
            for name in ("scheduledAt", "plannedAt", "retryAt", "leaseUntil")
            if isinstance(doc.get(name), datetime) and doc[name] > self.now
        ]
        return min(later, default=None)

    def _late_story(self, text: str) -> str:
        m = self.by_text[text]
        c = self._campaign(m.campaign)
        return (
            f"scheduledAt {m.scheduled:%H:%M:%S}, latest plannedAt seen {m.planned}, seen in "
            f"time {m.seen_in_time}, resumed {c.resumed if c else None}, taken over "
            f"{m.taken_over}"
        )

    def _describe(self, docs: list[dict[str, Any]]) -> str:
        keep = ("content", "status", "isPicked", "isSent", "isDeleted", "plannedAt", "lastError")
        return "; ".join(str({k: d.get(k) for k in keep if k in d}) for d in docs)


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _session_of(request: Request) -> str | None:
    """The WAHA session a message request is for (sendText's body, or new-message-id's path)."""
    if request.path == "/api/sendText":
        return (request.json() or {}).get("session")
    parts = request.path.split("/")
    return parts[2] if len(parts) == 4 else None


@pytest.mark.timeout(int(os.environ.get("POLLER_MODEL_TIMEOUT", "600")))  # shrinking a failure
def test_the_poller_keeps_its_promises_whatever_happens_around_it(
    mongo_uri: str,
    db_name: str,
    make_settings: Callable[..., Settings],
    openapi_validator: Callable[[Request], str | None] | None,
) -> None:
    PollerModel.env = Env(mongo_uri, db_name, make_settings, openapi_validator)
    run_state_machine_as_test(
        PollerModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
