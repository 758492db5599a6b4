"""Opt-outs: chats that asked a WhatsApp session to stop sending to them. Written by `poller`
(from an inbound opt-out keyword) or by the web app; one document per session and chat."""

from __future__ import annotations

from datetime import datetime

from pymongo.collection import Collection

from poller.store.base import Doc, create_index

# A message to a chat that opted out of its session ends `cancelled` with this reason.
OPTED_OUT = "Not sent: the recipient opted out."
# For opt-outs the web app writes with an `_id` of its own.
CHAT_INDEX = [("session", 1), ("chatId", 1)]


def optout_id(session: str, chat_id: str) -> str:
    """The one document of a session and a chat: `<session>:<chatId>`."""
    return f"{session}:{chat_id}"


class Optouts:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def ensure_indexes(self) -> None:
        create_index(self.collection, CHAT_INDEX, "poller_optout_chat")

    def add(self, session: str, chat_id: str, at: datetime, text: str) -> bool:
        """Record that `chat_id` opted out of `session`; True when it was not opted out."""
        found = self.collection.update_one(
            {"_id": optout_id(session, chat_id)},
            {
                "$setOnInsert": {"session": session, "chatId": chat_id, "at": at},
                "$set": {"text": text},
            },
            upsert=True,
        )
        return found.upserted_id is not None

    def remove(self, session: str, chat_id: str) -> bool:
        """Forget an opt-out (the chat opted in again); True when there was one."""
        return self.collection.delete_one({"_id": optout_id(session, chat_id)}).deleted_count == 1

    def among(self, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (session, chat id) pairs opted out: one read for all of them."""
        if not pairs:
            return set()
        query = {
            "session": {"$in": sorted({s for s, _ in pairs})},
            "chatId": {"$in": sorted({c for _, c in pairs})},
        }
        found = self.collection.find(query, {"session": 1, "chatId": 1}, hint=CHAT_INDEX)
        return {(d["session"], d["chatId"]) for d in found} & pairs

    def since(self, at: datetime) -> int:
        return self.collection.count_documents({"at": {"$gte": at}})

    def latest(self, limit: int = 10) -> list[Doc]:
        return list(self.collection.find({}, {"text": 0}).sort("at", -1).limit(limit))
