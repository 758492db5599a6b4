"""Opt-outs: chats that asked a WhatsApp session to stop sending to them. Written by `poller`
(from an inbound opt-out or opt-in keyword) or by the web app; one document per session and
chat.

A chat is matched by `chatKey`: its chat id as `poller` compares chat ids (a number as people
write it, `+44 7700 900123`, is `447700900123@c.us`; an `@lid` sender whose number WAHA knows
is that number). The web app writes `chatId` only: `poller` adds `chatKey` to such a document
the first time it reads it.

`poller`'s own documents keep the time of the event that last changed them (`changedAt`): an
event that happened before it, arriving late or posted again, changes nothing. An opt-in
keeps the document, with `optedInAt`, so that a late opt-out that happened before it is still
recognised as older.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from loguru import logger
from pymongo import ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from poller.contract import normalise_chat_id
from poller.store.base import Doc, create_index

# A message to a chat that opted out of its session ends `cancelled` with this reason.
OPTED_OUT = "Not sent: the recipient opted out."
# Opt-outs in force: not opted in again since.
ACTIVE: Doc = {"optedInAt": None}
# Every opt-out by the chat it stops; `chatKey: null` finds those not normalised yet.
KEY_INDEX = [("chatKey", 1), ("session", 1)]


def optout_id(session: str, chat_id: str) -> str:
    """The one document of a session and a chat that `poller` writes: `<session>:<chatId>`."""
    return f"{session}:{chat_id}"


class Optouts:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def ensure_indexes(self) -> None:
        create_index(self.collection, KEY_INDEX, "poller_optout_key")

    def add(self, session: str, chat_id: str, at: datetime, text: str) -> bool:
        """Record that `chat_id` opted out of `session` at `at`; True when it had not opted
        out (or had opted in again) before. An opt-out older than the document's last change
        changes nothing."""
        update = {"$set": {"at": at, "text": text}, "$unset": {"optedInAt": ""}}
        applied, before = self._change(session, chat_id, at, update)
        return applied and (before is None or before.get("optedInAt") is not None)

    def remove(self, session: str, chat_id: str, at: datetime) -> bool:
        """Record that `chat_id` opted in again at `at`; True when it was opted out. An opt-in
        older than the document's last change changes nothing."""
        applied, before = self._change(session, chat_id, at, {"$set": {"optedInAt": at}})
        return applied and before is not None and before.get("optedInAt") is None

    def _change(
        self, session: str, chat_id: str, at: datetime, update: Doc
    ) -> tuple[bool, Doc | None]:
        """Apply an event of time `at` to the chat's document unless a later one was applied:
        whether it was, and the document before (None when there was none)."""
        newer = {"$or": [{"changedAt": {"$lt": at}}, {"changedAt": None}]}
        fields = {"session": session, "chatId": chat_id, "chatKey": chat_id, "changedAt": at}
        update = {**update, "$set": {**update["$set"], **fields}}
        try:
            before = self.collection.find_one_and_update(
                {"_id": optout_id(session, chat_id), **newer},
                update,
                upsert=True,
                return_document=ReturnDocument.BEFORE,
            )
        except DuplicateKeyError:  # the document exists, changed by a later event
            return False, None
        return True, before

    def among(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (session, chat key) pairs opted out: one read for all of them, which
        also brings the documents the web app wrote since the last (no `chatKey` yet)."""
        if not pairs:
            return set()
        query = {
            "$or": [
                {
                    "chatKey": {"$in": sorted({c for _, c in pairs})},
                    "session": {"$in": sorted({s for s, _ in pairs})},
                    **ACTIVE,
                },
                {"chatKey": None},
            ]
        }
        found: set[tuple[str, str]] = set()
        fresh: list[tuple[Any, str]] = []
        for doc in self.collection.find(query, {"session": 1, "chatId": 1, "chatKey": 1}):
            key = doc.get("chatKey") or self._key(doc, fresh)
            if key is not None:
                found.add((str(doc.get("session")), key))
        self._normalise(fresh)
        return found & pairs

    def _key(self, doc: Doc, fresh: list[tuple[Any, str]]) -> str | None:
        """The chat key of a document the web app wrote; noted in `fresh` to be written."""
        key = normalise_chat_id(doc.get("chatId"))
        fresh.append((doc["_id"], key or ""))  # "": no chat `poller` could send to
        return key

    def _normalise(self, fresh: list[tuple[Any, str]]) -> None:
        """Write `chatKey` on the web app's documents; one MongoDB refuses (a validator) is
        read and normalised again at the next read, and the rest are written."""
        if not fresh:
            return
        named = [({"_id": i, "chatKey": None}, {"$set": {"chatKey": k}}) for i, k in fresh]
        try:
            self.collection.bulk_write([UpdateOne(*n) for n in named], ordered=False)
        except BulkWriteError as exc:
            refused = len(exc.details.get("writeErrors", []))
            logger.warning("{} opt-out(s) could not be given a chatKey: {}", refused, exc)

    def since(self, at: datetime) -> int:
        return self.collection.count_documents({"at": {"$gte": at}, **ACTIVE})

    def latest(self, limit: int = 10) -> list[Doc]:
        return list(self.collection.find(ACTIVE, {"text": 0}).sort("at", -1).limit(limit))
