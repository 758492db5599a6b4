"""The HTTP API that scripts and the dashboard's own forms schedule through: one message or
many (`POST /api/messages`), a campaign from a list of recipients or a CSV text, with a dry run
(`POST /api/campaigns`), a message looked up (`GET /api/messages/<id>`) and cancelled
(`POST /api/messages/<id>/cancel`). `openapi.py` describes it.

Every check is poller.scheduling's or poller.campaign_import's, made on the whole request before
anything is written. A body that is not the request's shape answers 400, one whose values are
wrong 422; both list the problems, each naming its field. A POST with an `Idempotency-Key` is
answered once: a retry with the same key and body gets the same answer and writes nothing
again; the same key with another body answers 422 (store/requests.py keeps the keys).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from werkzeug.wrappers import Request, Response

from poller import campaign_import, contract, scheduling, status
from poller.pacing import Pacing
from poller.scheduling import Invalid
from poller.store import Doc, Store

# Messages in one POST at most: more go as a campaign.
MAX_MESSAGES = 1000
# An idempotency key: printable ASCII without spaces, as an HTTP header carries it.
KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
# A message the web app marked done (isSent, isDeleted) or handles itself (isPicked, no status):
# poller will not send it.
DONE = "done"
# The statuses a message ends with: the page stops asking about it then.
FINAL = (*contract.FINAL, DONE)
BEING_SENT = (contract.CLAIMED, contract.SENDING)
# What a view reads: what `scheduling.planned` shows, the web app's flags among it.
PROJECTION = scheduling.VIEW
# What a message's view shows besides its id and status.
SHOWN = (
    "chatId",
    "session",
    "campaignId",
    "scheduledAt",
    "plannedAt",
    "slotAt",
    "sentAt",
    "finishedAt",
    "lastError",
    "ack",
)
CAMPAIGN_FIELDS = {
    "name",
    "text",
    "recipients",
    "csv",
    "at",
    "in",
    "session",
    "priority",
    "column",
    "dryRun",
}
# A stand-in recipient: a campaign's own fields (at, in, session, priority) are checked once
# by the rule each of its messages is checked with, so that a bad one is named once, not per row.
PROBE = "10000000"


class Refused(Exception):
    """A request answered `code` with its problems; nothing was written."""

    def __init__(self, code: int, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.code, self.problems = code, problems


class Api:
    """The API's answers, over the dashboard's store, pacing (for dry runs) and clock."""

    def __init__(self, store: Store, pacing: Pacing, clock: Callable[[], datetime]) -> None:
        self.store, self.pacing, self.clock = store, pacing, clock

    # -- POST --------------------------------------------------------------------------------------

    def post(self, request: Request) -> Response:
        """`POST /api/messages` or `/api/campaigns`: the body read and checked, then answered,
        once per Idempotency-Key."""
        act = self.messages if request.path == "/api/messages" else self.campaign
        try:
            body = _body(request)
            key = _key(request)
        except Refused as exc:
            return _json(*_refusal(exc))
        if key is None:
            return _json(*self._answer(act, body, None))
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(f"{request.path}\n{canonical}".encode()).hexdigest()
        earlier = self.store.requests.begin(key, digest, self.clock())
        if earlier is not None:
            return _replay(earlier, digest)
        try:
            code, answer = self._answer(act, body, key)
        except BaseException:
            self.store.requests.release(key)  # a retry runs it again
            raise
        text = status.to_json(answer)
        if code < 300:
            self.store.requests.finish(key, code, text)
        else:
            self.store.requests.release(key)  # refused as asked: a corrected body may use it
        return Response(text, status=code, content_type="application/json")

    def _answer(
        self, act: Callable[[Any, str | None], tuple[int, Doc]], body: Any, key: str | None
    ) -> tuple[int, Doc]:
        try:
            return act(body, key)
        except Refused as exc:
            return _refusal(exc)
        except Invalid as exc:
            return _refusal(Refused(422, exc.problems))

    def messages(self, body: Any, key: str | None) -> tuple[int, Doc]:
        """One message (an object), or many (a list, or `{"messages": [...]}`): all checked,
        then written together; 201 with their ids and views."""
        items, named = _messages(body)
        now = self.clock()
        docs, problems = [], []
        for n, item in enumerate(items):
            where = f"messages[{n}]." if named else ""
            if not isinstance(item, dict):
                raise Refused(400, [f"messages[{n}]: must be a JSON object (a message)"])
            try:
                request = scheduling.as_request(item)
                docs.append(
                    scheduling.document(request, now, self.pacing.zone, self.lookback, files=False)
                )
            except Invalid as exc:
                problems += [where + problem for problem in exc.problems]
        if problems:
            raise Invalid(problems)
        ids = scheduling.add(self.store, docs, key)
        found = self.store.messages.collection.find({"_id": {"$in": ids}}, PROJECTION)
        by_id = {doc["_id"]: doc for doc in found}
        return 201, {"ids": ids, "messages": [view(by_id[i]) for i in ids if i in by_id]}

    def campaign(self, body: Any, key: str | None = None) -> tuple[int, Doc]:
        """A campaign checked whole and planned as the poller will plan it: with `dryRun`, 200
        and the preview, nothing written; otherwise written, 201 (importing it again writes
        nothing new: `written` 0, `new` false)."""
        if not isinstance(body, dict):
            raise Refused(400, ["body: a campaign must be a JSON object"])
        unknown = sorted(set(body) - CAMPAIGN_FIELDS)
        if unknown:
            raise Invalid([f"{name}: not a field of a campaign" for name in unknown])
        dry = body.get("dryRun", False)
        if not isinstance(dry, bool):
            raise Refused(400, ["dryRun: must be true or false"])
        for name in ("csv", "column", "session"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise Refused(400, [f"{name}: must be text"])
        columns, rows, source = _recipients(body)
        now = self.clock()
        priority = body.get("priority")
        probe = scheduling.Request(
            PROBE, "-", body.get("at"), body.get("in"), body.get("session", "default"), priority
        )
        problems = []
        try:
            own = scheduling.document(probe, now, self.pacing.zone, self.lookback, files=False)
            at, session = own["scheduledAt"], own["session"]
        except Invalid as exc:
            # Named once; the rows are still checked (with fields that pass) for their own.
            problems += exc.problems
            at, session, priority = now, "default", None
        try:
            plan = campaign_import.draft(
                self.store,
                body.get("name", ""),  # draft names a missing one, and a missing template
                columns,
                rows,
                body.get("text", ""),
                at,
                now,
                self.pacing.zone,
                self.lookback,
                session,
                priority,
                body.get("column"),
            )
        except Invalid as exc:
            problems += [_named(problem, source) for problem in exc.problems]
        if problems:
            raise Invalid(problems)
        preview = campaign_import.preview(self.store, self.pacing, plan, now).as_json()
        campaign = plan.campaign
        answer = {"dryRun": dry, "campaign": campaign["_id"], "name": campaign["name"]}
        if dry:
            return 200, {**answer, "messages": len(plan.messages), "preview": preview}
        written, new = campaign_import.commit(self.store, plan)
        return 201, {
            **answer,
            "messages": len(plan.messages),
            "written": written,
            "new": new,
            "preview": preview,
        }

    # -- one message -------------------------------------------------------------------------------

    def message(self, text: str) -> Response:
        """`GET /api/messages/<id>`: the message's view; 404 when there is none."""
        message_id = scheduling.message_id(text)
        if message_id is None:
            return _malformed(text)
        found = self._read(message_id)
        if found is None:
            return _json(404, {"error": f"no message has the id {text}"})
        return _json(200, view(found))

    def cancel(self, text: str) -> Response:
        """`POST /api/messages/<id>/cancel`: a waiting message ends `cancelled`; 404 when there
        is none, 409 (and why) when it is being sent or has ended."""
        message_id = scheduling.message_id(text)
        if message_id is None:
            return _malformed(text)
        cancelled = scheduling.cancel(self.store, message_id, self.clock())
        found = self._read(message_id)
        if found is None:
            return _json(404, {"error": f"no message has the id {text}"})
        shown = view(found)
        if cancelled:
            return _json(200, shown)
        if shown["status"] in BEING_SENT:
            why = "it is being sent: a poller has claimed it"
        elif shown["status"] == DONE:
            why = "the web app marked it done (isSent, isDeleted) or handles it (isPicked)"
        elif shown["final"]:
            why = f"it has ended: {shown['status']}"
        else:
            why = "it is no longer waiting"
        return _json(409, {"error": f"not cancelled: {why}", "message": shown})

    def _read(self, message_id: Any) -> Doc | None:
        return self.store.messages.collection.find_one({"_id": message_id}, PROJECTION)

    @property
    def lookback(self) -> timedelta:
        return self.store.timings.lookback


def view(doc: Doc) -> Doc:
    """A message as the API shows it. `status` is the poller's (claimed, sending, retry,
    pending on the way; sent, failed, expired, unknown, cancelled at the end), or before it
    has one, `done` (the web app marked it done, or handles it itself), `planned` (a poller
    planned it for `plannedAt`) or `waiting` (no poller has seen it yet); `final` once it has
    ended."""
    state = _state(doc)
    return {"id": doc["_id"], "status": state, "final": state in FINAL} | {
        name: doc.get(name) for name in SHOWN
    }


def _state(doc: Doc) -> str:
    if doc.get("status"):
        return str(doc["status"])
    if contract.done(doc) or doc.get("isPicked") is True:
        return DONE
    return "planned" if doc.get("plannedAt") else "waiting"


def _body(request: Request) -> Any:
    try:
        return json.loads(request.get_data(cache=False))
    except UnicodeDecodeError as exc:
        raise Refused(400, [f"body: not UTF-8 text ({exc.reason})"]) from exc
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise Refused(400, [f"body: not JSON ({exc.msg} at {where})"]) from exc


def _key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not KEY.match(key):
        raise Refused(400, ["Idempotency-Key: 1 to 200 printable characters without spaces"])
    return key


def _messages(body: Any) -> tuple[list[Any], bool]:
    """The messages of a body, and whether it was a list (problems then name each by its place)."""
    if isinstance(body, list):
        items = body
    elif isinstance(body, dict) and "messages" in body:
        beside = sorted(set(body) - {"messages"})
        if beside:
            raise Refused(400, [f"{name}: not a field beside messages" for name in beside])
        items = body["messages"]
        if not isinstance(items, list):
            raise Refused(400, ["messages: must be a list of messages"])
    elif isinstance(body, dict):
        return [body], False
    else:
        raise Refused(400, ['body: a message (a JSON object), a list of them, or {"messages": []}'])
    if not items:
        raise Invalid(["messages: empty; give at least one message"])
    if len(items) > MAX_MESSAGES:
        raise Invalid(
            [
                f"messages: {len(items)} of them; at most {MAX_MESSAGES} in one request "
                "(POST /api/campaigns takes more)"
            ]
        )
    return items, True


def _recipients(body: Doc) -> tuple[list[str], list[dict[str, str]], str]:
    """The columns and rows of a campaign's `recipients` or `csv`, and which of the two."""
    recipients, text = body.get("recipients"), body.get("csv")
    if recipients is not None and text is not None:
        raise Invalid(["recipients and csv: give one of them, not both"])
    if text is not None:
        try:
            columns, rows = campaign_import.read_csv(text)
        except Invalid as exc:
            raise Invalid([_named(problem, "csv") for problem in exc.problems]) from exc
        return columns, rows, "csv"
    if recipients is None:
        raise Invalid(["recipients: give the recipients (a list of objects), or csv: a CSV text"])
    if not isinstance(recipients, list):
        raise Refused(400, ["recipients: must be a list of objects, one per recipient"])
    seen: dict[str, None] = {}  # the columns, in the order they first appear
    rows = []
    for n, recipient in enumerate(recipients):
        if not isinstance(recipient, dict):
            raise Refused(400, [f"recipients[{n}]: must be a JSON object (one recipient)"])
        row = {}
        for name, value in recipient.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
                raise Refused(400, [f"recipients[{n}].{name}: must be text or a whole number"])
            row[name.strip()] = "" if value is None else str(value).strip()
            seen.setdefault(name.strip())
        rows.append(row)
    return list(seen), rows, "recipients"


def _named(problem: str, source: str) -> str:
    """A campaign's problem as the API names its fields: the import's `campaign:` is `name`,
    its `file:` the `csv` or the `recipients`, and a CSV's row N (the header is row 1) is
    `recipients[N - 2]` when the recipients came as a list."""
    head, _, rest = problem.partition(": ")
    if head == "campaign":
        return f"name: {rest}"
    if head == "file":
        return f"{source}: {rest}"
    row = re.fullmatch(r"row (\d+)", head)
    if row and source == "recipients":
        rest = re.sub(
            r"is also on row (\d+)$", lambda m: f"is also in recipients[{_at(m[1])}]", rest
        )
        return f"recipients[{_at(row[1])}]: {rest}"
    return problem


def _at(row: str) -> int:
    return int(row) - 2


def _malformed(text: str) -> Response:
    return _json(400, {"error": f"id: {text[:60]!r} is not a message id (24 hex digits)"})


def _replay(earlier: Doc, digest: str) -> Response:
    """The answer to a request whose key was used before."""
    if earlier.get("digest") != digest:
        problem = (
            "Idempotency-Key: already used for another request (another body or route); "
            "a new request needs a new key"
        )
        return _json(422, {"error": problem, "problems": [problem]})
    answer = earlier.get("answer")
    if not isinstance(answer, dict):
        problem = "Idempotency-Key: the first request with this key is still being answered"
        response = _json(409, {"error": problem, "problems": [problem]})
        response.headers["Retry-After"] = "1"
        return response
    response = Response(answer["json"], status=answer["code"], content_type="application/json")
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _refusal(exc: Refused) -> tuple[int, Doc]:
    """The answer to a request refused: `error`, the problems in one line (nothing was
    written), and `problems`, one a field."""
    shown = "; ".join(exc.problems[:3]) + (
        f"; and {len(exc.problems) - 3} more" if len(exc.problems) > 3 else ""
    )
    return exc.code, {"error": f"nothing was written: {shown}", "problems": exc.problems}


def _json(code: int, body: Doc) -> Response:
    return Response(status.to_json(body), status=code, content_type="application/json")
