"""Recurring schedules: shortly before each occurrence of a definition's cron rule, one
campaign with one message per target, exactly once.

Exactly once without locks: the campaign's `_id` and each message's are derived from the
definition and the occurrence, so a second poller, or the same one after a crash, writes the
same documents and MongoDB's unique `_id` keeps the first. Messages are written before their
campaign, and an occurrence counts as done (`lastOccurrenceAt`) only after both: a crash in
between is finished by the next tick, never duplicated. From there the messages go the usual
way: plan, pacing, caps, quiet hours, pause and cancel, rollup.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from bson import ObjectId
from bson.errors import BSONError
from loguru import logger
from pymongo.errors import BulkWriteError, ConnectionFailure, PyMongoError, WriteError

from poller import cron
from poller.contract import (
    content,
    derived_id,
    no_session,
    normalise_chat_id,
    session_name,
    show,
)
from poller.store import Doc, Store
from poller.store.base import DUPLICATE_KEY
from poller.store.definitions import NO

# A campaign's status while its occurrence has not come, and when no poller ran at it.
SCHEDULED, MISSED = "scheduled", "missed"
# Of a stretch of missed occurrences, the latest this many become campaigns; the earlier ones
# are counted in the first of them (up to MISSED_COUNTED).
MISSED_KEPT = 10
MISSED_COUNTED = 10_000
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
# Fields a message of an occurrence takes from its definition as they are.
PASSED_ON = ("session", "sessionId", "priority", "media")
# What a value the web app wrote can raise on its way through a definition: a bad type or
# range, the zone database (a region such as "Europe" is a folder: OSError), BSON, or a write
# MongoDB refuses. The definition records it and the others go on. Anything else (a bug, a
# crash) fails the tick, as before.
BAD_DOCUMENT = (
    ArithmeticError,
    AttributeError,
    LookupError,
    OSError,
    TypeError,
    ValueError,
    BSONError,
    PyMongoError,
)


@dataclass
class Occurrences:
    """What one tick materialised, and when the next occurrence is to be."""

    created: int = 0
    missed: int = 0
    next_at: datetime | None = None

    def expect(self, at: datetime | None) -> None:
        if at is not None and (self.next_at is None or at < self.next_at):
            self.next_at = at


def materialise(store: Store, now: datetime, lead: timedelta, zone: ZoneInfo) -> Occurrences:
    """Materialise every active definition's occurrences up to `lead` from now; record those
    more than the lookback window past as missed. `zone`: for definitions without a timezone."""
    found = Occurrences()
    for light in store.definitions.light():
        try:
            if light.get("isActive") in NO:
                _stopped(store, light, now)
            else:
                _definition(store, light, now, lead, zone, found)
        except BAD_DOCUMENT as exc:
            if _unreachable(exc):
                raise
            _broken(store, light, exc)
    return found


def _unreachable(exc: Exception) -> bool:
    """MongoDB did not answer, or not in time: the tick fails as a MongoDB outage, and no
    definition is blamed for it."""
    return isinstance(exc, ConnectionFailure) or (isinstance(exc, PyMongoError) and exc.timeout)


def _broken(store: Store, light: Doc, exc: Exception) -> None:
    """Record why the definition raised. It has no next occurrence until it works again: it is
    tried again at each tick, quietly while the reason stays the same (a refused write, once
    accepted, still goes out within the lookback window)."""
    reason = _reason(light, exc)
    try:
        _fail(store, light, reason, nothing_next=True)
    except PyMongoError as again:
        if _unreachable(again):
            raise
        logger.error(
            "recurring schedule {} ({}): {}; and this could not be recorded on it: {}",
            show(light.get("name")),
            light["_id"],
            reason,
            str(again)[:200],
        )


def _reason(light: Doc, exc: Exception) -> str:
    """What the definition raised, in a sentence that stays the same while the cause does (no
    document ids: a refused write names MongoDB's own reason)."""
    if isinstance(exc, WriteError | BulkWriteError):
        details = exc.details or {}
        # Of a batch, the first error that is not an `_id` written already (an earlier try).
        errors = [e for e in details.get("writeErrors", []) if e.get("code") != DUPLICATE_KEY]
        refused = errors[0] if errors else details
        why = f"{refused.get('errmsg', exc)} (code {refused.get('code', exc.code)})"
        return f"MongoDB refused a write for this definition: {why[:200]}."
    rule = f"cron {show(light.get('cron'))}, timezone {show(light.get('timezone'))}"
    return (
        f"The poller could not use this definition ({rule}): "
        f"{type(exc).__name__}: {str(exc)[:200]}."
    )


def _stopped(store: Store, light: Doc, now: datetime) -> None:
    """A definition the web app switched off: forget its rule and next occurrence, and note
    since when it is off (once). Switched on, it starts from then, without the occurrences it
    had while off."""
    if "appliedRule" in light or "appliedSince" not in light:
        since = light.get("appliedSince") or now
        store.definitions.note(
            light["_id"], {"appliedSince": since}, ("appliedRule", "nextOccurrenceAt")
        )


def _definition(
    store: Store, light: Doc, now: datetime, lead: timedelta, zone: ZoneInfo, found: Occurrences
) -> None:
    rule = cron.parse(light.get("cron"), light.get("timezone") or zone.key)
    window = _window(light)
    if isinstance(rule, str) or isinstance(window, str):
        _fail(store, light, rule if isinstance(rule, str) else str(window), nothing_next=True)
        return
    after = max(_since(store, light, rule, now), window[0])
    if isinstance(light.get("lastOccurrenceAt"), datetime):
        after = max(after, light["lastOccurrenceAt"])
    missed: deque[datetime] = deque(maxlen=MISSED_KEPT)
    counted, problem = 0, ""
    while True:
        at = cron.next_after(rule, after)
        if at is None or (window[1] is not None and at > window[1]):
            at = None
            break
        if at > now + lead:
            break
        if at < now - store.timings.lookback:
            missed.append(at)
            counted += 1
            after = at if counted < MISSED_COUNTED else now - store.timings.lookback
            continue
        _record_missed(store, light, rule, missed, counted, now, found)
        missed.clear()
        counted = 0
        problem = _occur(store, light["_id"], rule, at, now)
        if problem:
            # Tried again at the next regular tick: fixed within the lookback window, the
            # occurrence still goes out; not fixed, it is recorded as missed.
            _fail(store, light, problem)
            break
        found.created += 1
        after = at
    _record_missed(store, light, rule, missed, counted, now, found)
    if at != light.get("nextOccurrenceAt"):
        store.definitions.note(light["_id"], {"nextOccurrenceAt": at})
    if at is not None and not problem:
        found.expect(at - lead)


def _occur(store: Store, definition_id: Any, rule: cron.Rule, at: datetime, now: datetime) -> str:
    """Write the occurrence `at`: its messages, then its campaign; "" once written, else why
    the definition (read whole now) cannot be used."""
    doc = store.definitions.get(definition_id)
    if doc is None:
        return "The definition was deleted."
    targets = _usable(doc, store.sessions.collection.name, store.sessions.names([doc]))
    if isinstance(targets, str):
        return targets
    campaign_id = _id(definition_id, at)
    messages = [_message(doc, campaign_id, at, chat_id, now) for chat_id in targets]
    store.messages.insert(messages)
    campaign = {
        "_id": campaign_id,
        "name": _name(doc, at, rule.zone),
        "definitionId": definition_id,
        "occurrenceAt": at,
        "status": SCHEDULED,
        "stats": {"total": len(messages)},
        "createdAt": now,
    }
    if store.campaigns.insert(campaign):
        when = cron.local_label(at, rule.zone)
        logger.info(
            "recurring schedule {}: {} messages for {}", show(doc.get("name")), len(messages), when
        )
    store.definitions.reached(definition_id, at, fine=True)
    return ""


def _record_missed(
    store: Store,
    light: Doc,
    rule: cron.Rule,
    missed: deque[datetime],
    counted: int,
    now: datetime,
    found: Occurrences,
) -> None:
    """Record each missed occurrence kept as a campaign `missed`, without messages; the first
    also counts those before it that were not kept."""
    if not missed:
        return
    lookback = store.timings.lookback.total_seconds()
    earlier = counted - len(missed)
    for n, at in enumerate(missed):
        label = cron.local_label(at, rule.zone)
        reason = (
            f"Not sent: no poller was running at {label} nor in the {lookback:g} s after it, "
            "and an occurrence is never sent later than that."
        )
        if light.get("lastError"):
            reason = f"Not sent: the definition could not be used at {label}: {light['lastError']}"
        if n == 0 and earlier:
            more = "or more " if counted >= MISSED_COUNTED else ""
            reason += f" {earlier} {more}earlier occurrences were missed too."
        store.campaigns.insert(
            {
                "_id": _id(light["_id"], at),
                "name": _name(light, at, rule.zone),
                "definitionId": light["_id"],
                "occurrenceAt": at,
                "status": MISSED,
                "lastError": reason,
                "createdAt": now,
                "completedAt": now,
            }
        )
    found.missed += counted
    logger.warning(
        "recurring schedule {}: {} occurrences missed, the last at {}",
        show(light.get("name")),
        counted,
        cron.local_label(missed[-1], rule.zone),
    )
    store.definitions.reached(light["_id"], missed[-1], fine=False)


def _since(store: Store, light: Doc, rule: cron.Rule, now: datetime) -> datetime:
    """Since when the definition's rule applies: its creation when first seen, else the moment
    a poller saw the rule changed (or the definition switched on again)."""
    since = light.get("appliedSince")
    if light.get("appliedRule") == rule.key and isinstance(since, datetime):
        return since
    since = _created(light, now) if since is None else now
    store.definitions.note(light["_id"], {"appliedRule": rule.key, "appliedSince": since})
    return since


def _created(light: Doc, now: datetime) -> datetime:
    created = light.get("createdAt")
    if isinstance(created, datetime):
        return min(created, now)
    if isinstance(light["_id"], ObjectId):
        return min(light["_id"].generation_time, now)
    return now


def _window(light: Doc) -> tuple[datetime, datetime | None] | str:
    """From when (inclusive) to when the definition occurs, or why it cannot be read."""
    bounds: list[datetime | None] = []
    for name in ("startAt", "endAt"):
        value = light.get(name)
        if value is not None and not isinstance(value, datetime):
            return f"{name} {show(value)} is not a date."
        bounds.append(value)
    start = bounds[0] - timedelta(microseconds=1) if bounds[0] else EARLIEST
    return start, bounds[1]


def _usable(doc: Doc, where: str, names: dict[str, str]) -> list[str] | str:
    """The definition's targets as chat ids, each once; or why it cannot be used (no targets,
    nothing to send, no session). `where` and `names`: as for `contract.prepare`."""
    found = content(doc, "definition")
    if isinstance(found, str):
        return found
    if session_name(doc, names) is None:
        return no_session(doc, where, "definition")
    raw = doc.get("targets")
    if not isinstance(raw, list) or not raw:
        return "targets must be a list of chat ids or phone numbers, and not empty."
    chat_ids: dict[str, None] = {}
    for n, target in enumerate(raw):
        chat_id = normalise_chat_id(target)
        if chat_id is None:
            return f"targets[{n}] {show(target)} is not a WhatsApp id or phone number."
        chat_ids[chat_id] = None
    return list(chat_ids)


def _message(doc: Doc, campaign_id: ObjectId, at: datetime, chat_id: str, now: datetime) -> Doc:
    message: Doc = {
        "_id": _id(doc["_id"], at, chat_id),
        "scheduledAt": at,
        "content": doc.get("content") or "",
        "chatId": chat_id,
        "campaignId": campaign_id,
        "definitionId": doc["_id"],
        "isSent": False,
        "isDeleted": False,
        "isPicked": False,
        "createdAt": now,
    }
    message.update({name: doc[name] for name in PASSED_ON if doc.get(name) is not None})
    return message


def _fail(store: Store, light: Doc, reason: str, nothing_next: bool = False) -> None:
    """Note why the definition cannot be used, once; with `nothing_next`, it has no next
    occurrence until it is fixed."""
    unset = ("nextOccurrenceAt",) if nothing_next else ()
    if light.get("lastError") != reason or (nothing_next and "nextOccurrenceAt" in light):
        logger.warning(
            "recurring schedule {} ({}): {}", show(light.get("name")), light["_id"], reason
        )
        store.definitions.note(light["_id"], {"lastError": reason}, unset)


def _name(doc: Doc, at: datetime, zone: ZoneInfo) -> str:
    """The definition's name and the occurrence's local date and time."""
    name = doc.get("name") if isinstance(doc.get("name"), str) else f"schedule {doc['_id']}"
    return f"{name} {at.astimezone(zone):%Y-%m-%d %H:%M}"


def _id(definition_id: Any, at: datetime, *parts: str) -> ObjectId:
    """The same ObjectId for the same definition, occurrence and target, in every poller."""
    return derived_id(at, str(definition_id), at.isoformat(), *parts)
