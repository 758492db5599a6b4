"""What can still stop a claimed message just before its send: its campaign paused or cancelled
since it was claimed, or its chat opted out of its session.

Read once per claim round for all its messages (one read of their campaigns, one of their chats'
opt-outs), and read again for the rest of a session's messages once older than FRESH: a
pause, a cancellation or a STOP is honoured for every send that starts more than FRESH after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from poller.contract import campaign_ref, normalise_chat_id, session_name
from poller.store import Doc, Store

# How old what the gate read may be when a message is sent, in seconds (of the wall clock: a
# tick's clock may be fixed).
FRESH = 1.0


@dataclass(frozen=True)
class Gate:
    statuses: dict[str, Any]  # campaign id as text -> its status
    opted_out: set[tuple[str, str]]  # (session, chat id)
    read_at: float = field(default_factory=time.monotonic)

    @classmethod
    def read(cls, store: Store, docs: list[Doc], names: dict[str, str]) -> Gate:
        campaigns = [c for d in docs if campaign_ref(c := d.get("campaignId"))]
        pairs = set()
        for doc in docs:
            session, chat = session_name(doc, names), normalise_chat_id(doc.get("chatId"))
            if session and chat and doc.get("optOutReply") is not True:
                pairs.add((session, chat))
        return cls(store.campaigns.statuses(campaigns), store.optouts.among(pairs))

    def campaign_status(self, doc: Doc) -> Any:
        campaign = doc.get("campaignId")
        return self.statuses.get(str(campaign)) if campaign_ref(campaign) else None

    def opted_out_of(self, session: str, chat_id: str, doc: Doc) -> bool:
        return doc.get("optOutReply") is not True and (session, chat_id) in self.opted_out

    def stale(self) -> bool:
        return time.monotonic() - self.read_at >= FRESH
