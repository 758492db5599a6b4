"""The HTTP API's idempotency keys: one document per `Idempotency-Key` a client sent with a
POST, holding a hash of what it asked and the answer it got, so that a retry gets that answer
again without writing a second time. MongoDB deletes each a day after it was written.

    {_id: <key>, digest: <sha-256 of the route and the body>, createdAt, answer: {code, json}}

`answer` is None while the first request with the key is being answered.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from poller.store.base import Doc, create_index

# Written by `poller` only (its dashboard's API); no setting names it, since nothing else reads it.
COLLECTION = "pollerrequests"
# How long a key is remembered: a client retries within minutes, a script run again the next
# day is a new request.
KEEP = timedelta(hours=24)
# A request that has not answered this long after it began with a key is taken for abandoned
# (its process died): a retry with that key runs again. Its writes are idempotent in themselves
# (ids derived from the key, or from the campaign), so running again writes nothing twice.
ABANDONED = timedelta(minutes=2)


class Requests:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def ensure_indexes(self) -> None:
        # MongoDB's TTL monitor (every 60 s) deletes a key KEEP after it was written.
        create_index(
            self.collection,
            "createdAt",
            "poller_request_expiry",
            expireAfterSeconds=int(KEEP.total_seconds()),
        )

    def begin(self, key: str, digest: str, now: datetime) -> Doc | None:
        """Hold `key` for a request whose route and body hash to `digest`. None when this
        request is the first with the key (or one that was abandoned): answer it, then
        `finish`. Otherwise the earlier request's document: its `digest`, and its `answer`
        (None while it is still being answered)."""
        for _ in range(2):  # a key deleted by its TTL between the insert and the read: again
            try:
                self.collection.insert_one(
                    {"_id": key, "digest": digest, "createdAt": now, "answer": None}
                )
                return None
            except DuplicateKeyError:
                found = self.collection.find_one({"_id": key})
            if found is None:
                continue
            began = found.get("createdAt")
            if found.get("answer") is None and isinstance(began, datetime):
                if began < now - ABANDONED and found.get("digest") == digest:
                    taken = self.collection.update_one(
                        {"_id": key, "answer": None, "createdAt": began},
                        {"$set": {"createdAt": now}},
                    )
                    if taken.modified_count:
                        return None
            return found
        return None

    def finish(self, key: str, code: int, json: str) -> None:
        """Keep the answer given to the request that holds `key`."""
        self.collection.update_one({"_id": key}, {"$set": {"answer": {"code": code, "json": json}}})

    def release(self, key: str) -> None:
        """Forget `key` without an answer (the request was refused as asked, or failed), so
        that a corrected request may use it."""
        self.collection.delete_one({"_id": key, "answer": None})
