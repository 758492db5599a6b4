"""The web app's WhatsApp session documents: read only, for names and daily caps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pymongo.collection import Collection

from poller.contract import ById, clean_session_name, id_variants, session_ref
from poller.store.base import Doc


class Sessions:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def names(self, docs: Iterable[Mapping[str, Any]]) -> dict[str, str]:
        """The session names the messages `docs` refer to by `sessionId`, by id as text (what
        `contract.session_name` takes); one read for all of them."""
        refs = {str(r.id): r.id for d in docs if isinstance(r := session_ref(d), ById)}
        if not refs:
            return {}
        variants = [v for ref in refs.values() for v in id_variants(ref)]
        found = self.collection.find({"_id": {"$in": variants}}, {"name": 1})
        return {str(d["_id"]): n for d in found if (n := clean_session_name(d.get("name")))}

    def daily_caps(self) -> dict[str, Any]:
        """The `dailyCap` of each session document that sets one, as written (the caller
        validates it), by session name."""
        found = self.collection.find(
            {"dailyCap": {"$exists": True, "$ne": None}}, {"name": 1, "dailyCap": 1}
        )
        return {n: d["dailyCap"] for d in found if (n := clean_session_name(d.get("name")))}
