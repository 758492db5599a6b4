"""A campaign from a list of recipients (a CSV file) and a template: every row checked before
anything is written, the text rendered per row, written in bulk under ids derived from the
campaign and the recipient (importing again adds nothing), and a dry run that plans it with
the poller's own planning rule (`lanes.slot`). `poller import`, the HTTP API's
`POST /api/campaigns` and the dashboard's CSV form all go through here.

Rows are numbered as a spreadsheet shows them: the header is row 1.
"""

from __future__ import annotations

import csv
import io
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from poller import lanes
from poller.context import session_cap
from poller.contract import derived_id, normalise_chat_id
from poller.pacing import Pacing
from poller.scheduling import Invalid, Request, document
from poller.store import Doc, Store
from poller.store.base import insert_once

# The column that holds the recipient, when none is named: the first of these, any case.
RECIPIENT_COLUMNS = ("phone", "chatid", "chat_id", "number", "to", "mobile", "whatsapp")
# Messages written per insert (and per step of the progress bar).
CHUNK = 1000


@dataclass
class Draft:
    """A checked campaign, not yet written: the campaign document and its messages."""

    campaign: Doc
    messages: list[Doc]


@dataclass
class Preview:
    """What a dry run found: how many messages, per session the first and last planned send,
    and when the last goes (`eta`)."""

    count: int
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    eta: datetime | None = None

    def as_json(self) -> Doc:
        return {"messages": self.count, "sessions": self.sessions, "eta": self.eta}


def read_csv(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a CSV text (comma or semicolon separated, a UTF-8 BOM allowed).
    Invalid when it has no header."""
    text = text.lstrip("\ufeff")
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    columns = [c.strip() for c in reader.fieldnames or [] if c is not None]
    if not columns:
        raise Invalid(["file: no header row (the first row names the columns)"])
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return columns, rows


def draft(
    store: Store,
    name: str,
    columns: list[str],
    rows: list[dict[str, str]],
    template: str,
    at: Any,
    now: datetime,
    zone: ZoneInfo,
    lookback: timedelta,
    session: str = "default",
    priority: Any = None,
    column: str | None = None,
) -> Draft:
    """Check every row and render its text; Invalid lists every problem, by row: a bad
    number, a variable empty in that row, a recipient twice, a recipient who opted out of the
    session, and a template that names an unknown column (a missing variable is an error,
    never an empty string)."""
    problems: list[str] = []
    if not isinstance(name, str) or not name.strip():
        problems.append("campaign: a campaign needs a name")
    recipient = _recipient_column(columns, column, problems)
    fields = _fields(template, columns, problems)
    if problems:
        raise Invalid(problems)
    key = f"{name.strip()}|{session}"
    known = store.campaigns.collection.find_one({"importKey": key}, {"_id": 1})
    campaign_id = known["_id"] if known else derived_id(now, "campaign", key)
    born = campaign_id.generation_time  # the same ids on every import of this campaign
    messages: list[Doc] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        raw = row.get(recipient, "")
        chat_id = normalise_chat_id(raw)
        if chat_id is None:
            problems.append(f"row {number}: {raw!r} is not a phone number or WhatsApp chat id")
            continue
        if chat_id in seen:
            problems.append(f"row {number}: {chat_id} is also on row {seen[chat_id]}")
            continue
        seen[chat_id] = number
        empty = [f for f in fields if not row.get(f)]
        if empty:
            names = ", ".join("{" + f + "}" for f in empty)
            problems.append(f"row {number}: {names} empty in this row")
            continue
        text = render(template, row)
        try:
            doc = document(
                Request(chat_id, text, at, None, session, priority),
                now,
                zone,
                lookback,
                campaign_id,
            )
        except Invalid as exc:
            problems += [f"row {number}: {p}" for p in exc.problems]
            continue
        doc["_id"] = derived_id(born, "import", str(campaign_id), chat_id)
        messages.append(doc)
    opted = store.optouts.among({(session, d["chatId"]) for d in messages})
    for doc in messages:
        if (session, doc["chatId"]) in opted:
            problems.append(f"row {seen[doc['chatId']]}: {doc['chatId']} opted out of {session}")
    if not rows:
        problems.append("file: no rows below the header")
    if problems:
        raise Invalid(problems)
    campaign = {
        "_id": campaign_id,
        "name": name.strip(),
        "status": "running",
        "createdAt": now,
        "importKey": key,  # its name and session: importing it again finds it
    }
    return Draft(campaign, messages)


def render(template: str, row: dict[str, str]) -> str:
    """The template with each `{column}` replaced by the row's value (`{{` and `}}` for
    braces)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            parts.append(row[name.strip()])
    return "".join(parts)


def preview(store: Store, pacing: Pacing, plan: Draft, now: datetime) -> Preview:
    """Plan the draft's messages as the poller will (each session's next free slot after what
    already waits in it, its pacing gaps, daily cap and quiet hours), without writing: the
    first and last planned send per session, and the eta. Pacing gaps are drawn at random, as
    the poller draws them: with PACING_MIN_SECONDS equal to PACING_MAX_SECONDS the plan is
    exact."""
    caps = store.sessions.daily_caps()
    where = store.sessions.collection.name
    found = Preview(len(plan.messages))
    slots: dict[str, Any] = {}
    order = sorted(plan.messages, key=lambda d: (-float(d.get("priority") or 0), d["scheduledAt"]))
    for doc in order:
        session, due, rank = doc["session"], doc["scheduledAt"], float(doc.get("priority") or 0)
        seen = max(due, now)
        cap = session_cap(caps, session, pacing.daily_cap, where)
        if isinstance(cap, str):
            found.sessions[session] = {"messages": 0, "notSending": cap}
            continue
        if session not in slots and lanes.paces(pacing, cap):
            lane = store.turns.lane(session)
            slots[session] = store.turns.slots(lane, seen, pacing.day(seen).isoformat())
        at, _ = lanes.slot(
            pacing, cap, slots.get(session), session, due, seen, rank, doc["content"]
        )
        row = found.sessions.setdefault(session, {"messages": 0, "first": at, "last": at})
        row["messages"] += 1
        row["first"], row["last"] = min(row["first"], at), max(row["last"], at)
        found.eta = max(found.eta or at, at)
    return found


def commit(
    store: Store, plan: Draft, progress: Callable[[int], None] | None = None
) -> tuple[int, bool]:
    """Write the campaign and its messages in bulk; those written before (the same import
    again) are left as they are. How many messages were new, and whether the campaign was."""
    new_campaign = store.campaigns.insert(plan.campaign)
    written = 0
    for chunk in _chunks(plan.messages, CHUNK):
        written += insert_once(store.messages.collection, chunk)
        if progress is not None:
            progress(len(chunk))
    return written, new_campaign


def _recipient_column(columns: list[str], named: str | None, problems: list[str]) -> str:
    if named is not None:
        if named not in columns:
            problems.append(f"column: {named!r} is not a column ({', '.join(columns)})")
        return named
    lowered = {c.lower(): c for c in columns}
    found = next((lowered[c] for c in RECIPIENT_COLUMNS if c in lowered), None)
    if found is None:
        problems.append(
            f"column: no column named phone or chatId ({', '.join(columns)}): name the "
            "recipient's column"
        )
        return ""
    return found


def _fields(template: str, columns: list[str], problems: list[str]) -> list[str]:
    """The columns the template names; a problem for each it names that is no column."""
    if not isinstance(template, str) or not template.strip():
        problems.append("text: the template is empty")
        return []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        problems.append(f"text: the template's braces do not pair ({exc}); write {{{{ for a brace")
        return []
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        name = name.strip()
        if spec or conversion or not name:
            problems.append(f"text: {{{name}}}: only plain {{column}} variables are allowed")
        elif name not in columns:
            problems.append(f"text: {{{name}}} names no column ({', '.join(columns)})")
        elif name not in names:
            names.append(name)
    return names


def _chunks(docs: list[Doc], size: int) -> Iterable[list[Doc]]:
    for start in range(0, len(docs), size):
        yield docs[start : start + size]
