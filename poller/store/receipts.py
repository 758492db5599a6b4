"""Delivery receipts on the messages WAHA sent: `ack`, `deliveredAt`, `readAt`, `deliveryError`.
They never change a message's status: it stays `sent`."""

from __future__ import annotations

from datetime import datetime

from pymongo import ASCENDING
from pymongo.collection import Collection

from poller.stats import DELIVERED, READ
from poller.store.base import Doc, create_index

# Messages by the engine's own id (`wahaKeyId`), and by WAHA's id as it answered the send
# (`wahaMessageId`: the only one on messages sent before `wahaKeyId` was written).
KEY_INDEX = [("wahaKeyId", ASCENDING)]
RECEIPT_INDEX = [("wahaMessageId", ASCENDING)]
# An ack of -1: WAHA's ERROR (the others: 0 PENDING, 1 SERVER, 2 DEVICE, 3 READ, 4 PLAYED).
ACK_ERROR = -1
DELIVERY_ERROR = "WhatsApp reported that it could not deliver the message (ack -1, ERROR)."


class Receipts:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def ensure_indexes(self) -> None:
        create_index(self.collection, KEY_INDEX, "poller_receipt_key", sparse=True)
        create_index(self.collection, RECEIPT_INDEX, "poller_receipt", sparse=True)

    def acknowledge(self, waha_message_id: str, key: str, ack: int, at: datetime) -> Doc | None:
        """Record a delivery receipt on the message an ack names: by the engine's own id
        (`key`), which every engine's forms of the id share (NOWEB answers the send with the
        bare id and acks with `true_<chat>_<id>`; in groups a participant follows; a chat may
        be named by its `@lid`), or by the whole id as it was stored before `wahaKeyId`. `ack`
        only ever rises; `deliveredAt` and `readAt` are the first times it reached 2 and 3; an
        ack of -1 notes `deliveryError` (its status stays `sent`). Any order, any repeat, the
        same result. The message (its `campaignId`), or None when no message has that id."""
        fields: Doc = {"ack": {"$max": ["$ack", ack]}}
        if ack >= DELIVERED:
            fields["deliveredAt"] = {"$ifNull": ["$deliveredAt", at]}
        if ack >= READ:
            fields["readAt"] = {"$ifNull": ["$readAt", at]}
        if ack == ACK_ERROR:
            fields["deliveryError"] = {"$ifNull": ["$deliveryError", DELIVERY_ERROR]}
        named = [{"wahaKeyId": key}, {"wahaMessageId": {"$in": [waha_message_id, key]}}]
        return self.collection.find_one_and_update(
            {"$or": named}, [{"$set": fields}], {"campaignId": 1}
        )
