"""What every part of the store shares: the document type, and how an index is created."""

from __future__ import annotations

from typing import Any

from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, OperationFailure

Doc = dict[str, Any]
DUPLICATE_KEY = 11000


def create_index(collection: Collection[Doc], keys: Any, name: str, **options: Any) -> None:
    """Create an index, unless the same keys exist already under another name or options (the
    web app's own index then serves as well: queries hint by key pattern)."""
    try:
        collection.create_index(keys, name=name, **options)
    except OperationFailure as exc:
        if exc.code not in (85, 86):
            raise


def insert_once(collection: Collection[Doc], docs: list[Doc]) -> int:
    """Insert documents whose `_id` may exist already (written by another poller, or before a
    crash): those are left as they are. Returns how many were inserted."""
    if not docs:
        return 0
    try:
        return len(collection.insert_many(docs, ordered=False).inserted_ids)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(error.get("code") != DUPLICATE_KEY for error in errors):
            raise
        return int(exc.details.get("nInserted", 0))
