"""What every part of the store shares: the document type, and how an index is created."""

from __future__ import annotations

from typing import Any

from pymongo.collection import Collection
from pymongo.errors import OperationFailure

Doc = dict[str, Any]


def create_index(collection: Collection[Doc], keys: Any, name: str, **options: Any) -> None:
    """Create an index, unless the same keys exist already under another name or options (the
    web app's own index then serves as well: queries hint by key pattern)."""
    try:
        collection.create_index(keys, name=name, **options)
    except OperationFailure as exc:
        if exc.code not in (85, 86):
            raise
