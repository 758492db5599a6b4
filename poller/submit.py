"""`poller send` (one message) and `poller import` (a campaign from a CSV file): messages put in
from a terminal or a script, checked before anything is written (poller/scheduling.py and
poller/campaign_import.py), with the planned send time or the dry run's plan printed.

Exit codes: 0 written (or the dry run ran), 1 MongoDB unreachable, 2 what was asked is wrong
(each problem on its own line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError
from rich.console import Console
from rich.progress import Progress

from poller import campaign_import, mongo_errors, scheduling, status
from poller.pacing import Pacing
from poller.settings import Settings
from poller.store import Store

# `poller send` waits this long for a running poller to plan a message that is due.
PLAN_WAIT_SECONDS = 5.0
# A file with more rows than this shows a progress bar while it is written.
PROGRESS_ROWS = 2000


def add_arguments(commands: Any) -> None:
    """The `send` and `import` subcommands' arguments."""
    send = commands.add_parser(
        "send",
        help="schedule one message, as the web app would write it",
        description="Schedule one message, as the web app would write it, and print when the "
        "poller plans to send it.",
    )
    send.add_argument("--to", required=True, help="phone number or WhatsApp chat id")
    send.add_argument("--text", help="the message (the caption, with --image)")
    _when_arguments(send)
    send.add_argument("--priority", type=float, help="higher goes first within its session")
    send.add_argument("--image", help="an image file or an http(s) URL")
    imports = commands.add_parser(
        "import",
        help="a campaign from a CSV file of recipients and a template",
        description="Write a campaign from a CSV file: one row per recipient, a column with the "
        "phone number or chat id, the other columns usable as {column} in the text. Every row is "
        "checked before anything is written; importing the same campaign again adds nothing.",
    )
    imports.add_argument("file", help="the CSV file (its first row names the columns)")
    imports.add_argument("--campaign", required=True, help="the campaign's name")
    text = imports.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the template, e.g. 'Hi {name}, ...'")
    text.add_argument("--template", help="a file holding the template")
    _when_arguments(imports)
    imports.add_argument("--priority", type=float, help="higher goes first within its session")
    imports.add_argument("--column", help="the recipient's column (default: phone, chatId, ...)")
    imports.add_argument("--dry-run", action="store_true", help="check and plan, write nothing")


def _when_arguments(parser: argparse.ArgumentParser) -> None:
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at", help="when: 2026-12-24T09:00 (in TIMEZONE) or with an offset")
    when.add_argument("--in", dest="within", help="when: from now, such as 30s, 10m, 2h, 1d")
    parser.add_argument("--session", default="default", help="the WAHA session (default)")


def send(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    request = scheduling.Request(
        args.to, args.text, args.at, args.within, args.session, args.priority, args.image
    )
    try:
        doc = scheduling.document(request, now, settings.zone, _lookback(settings))
    except scheduling.Invalid as exc:
        return _problems(exc)
    try:
        store = Store.connect(settings)
        try:
            [message_id] = scheduling.add(store, [doc])
            _out(
                f"message {message_id} written: to {doc['chatId']} through session "
                f"'{doc['session']}', scheduled for {_time(doc['scheduledAt'])}"
            )
            wait = PLAN_WAIT_SECONDS if doc["scheduledAt"] <= datetime.now(UTC) else 0.0
            found = scheduling.planned(store, message_id, wait) or {}
        finally:
            store.close()
    except PyMongoError as exc:
        return _unavailable(exc, settings)
    if found.get("plannedAt"):
        _out(f"planned for {_time(found['plannedAt'])}")
    elif found.get("status"):
        _out(f"{found['status']}: {found.get('lastError') or ''}".rstrip(": "))
    else:
        _out("not planned yet: a running poller plans it once it is due")
    return 0


def import_campaign(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    try:
        text = Path(args.file).read_text(encoding="utf-8-sig")
        template = args.text if args.text is not None else Path(args.template).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return _problems(scheduling.Invalid([f"file: cannot read it ({exc})"]))
    try:
        store = Store.connect(settings)
        try:
            return _import(store, settings, args, text, template.strip(), now)
        finally:
            store.close()
    except PyMongoError as exc:
        return _unavailable(exc, settings)


def _import(
    store: Store,
    settings: Settings,
    args: argparse.Namespace,
    text: str,
    template: str,
    now: datetime,
) -> int:
    try:
        columns, rows = campaign_import.read_csv(text)
        at = scheduling.when(args.at, args.within, now, settings.zone)
        if isinstance(at, str):
            raise scheduling.Invalid([at])
        plan = campaign_import.draft(
            store,
            args.campaign,
            columns,
            rows,
            template,
            at,
            now,
            settings.zone,
            _lookback(settings),
            args.session,
            args.priority,
            args.column,
        )
    except scheduling.Invalid as exc:
        return _problems(exc)
    found = campaign_import.preview(store, Pacing.from_settings(settings), plan, now)
    _out(f"campaign '{plan.campaign['name']}': {found.count} messages")
    for session, row in found.sessions.items():
        if "notSending" in row:
            _out(f"  session '{session}': not sending: {row['notSending']}")
        else:
            _out(
                f"  session '{session}': {row['messages']} messages, first planned for "
                f"{_time(row['first'])}, last for {_time(row['last'])}"
            )
    if found.eta is not None:
        _out(f"  eta {_time(found.eta)}")
    if args.dry_run:
        _out("dry run: nothing written")
        return 0
    if len(plan.messages) > PROGRESS_ROWS:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("writing", total=len(plan.messages))
            written, new = campaign_import.commit(store, plan, lambda n: progress.advance(task, n))
    else:
        written, new = campaign_import.commit(store, plan)
    again = len(plan.messages) - written
    _out(
        f"campaign {plan.campaign['_id']} {'written' if new else 'found'}: {written} messages "
        f"written" + (f", {again} already there" if again else "")
    )
    return 0


def _lookback(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.lookback_seconds)


def _time(at: datetime) -> str:
    """A time as `poller status` writes it: UTC, and how far from now."""
    return status.when(at, datetime.now(UTC))


def _problems(exc: scheduling.Invalid) -> int:
    for problem in exc.problems:
        sys.stderr.write(f"poller: {problem}\n")
    return 2


def _unavailable(exc: PyMongoError, settings: Settings) -> int:
    described = mongo_errors.describe(exc, settings.mongodb_timeout_seconds)
    sys.stderr.write(f"poller: MongoDB is unavailable: {described}\n")
    return 1


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
