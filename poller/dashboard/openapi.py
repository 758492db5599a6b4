"""The OpenAPI 3.1 description of the dashboard's HTTP API, served at `GET /api/openapi.json`.

Written by hand beside the code it describes (api.py, and the dashboard's own routes); the
tests check it is a valid description and that every answer they get matches it.
"""

from __future__ import annotations

from typing import Any

from poller import __version__, web

Doc = dict[str, Any]

ID: Doc = {"type": "string", "pattern": "^[0-9a-f]{24}$", "description": "24 hex digits"}
DATE: Doc = {"type": "string", "format": "date-time", "description": "ISO 8601, in UTC"}


def _ref(name: str) -> Doc:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_null(schema: Doc) -> Doc:
    return {"oneOf": [schema, {"type": "null"}]}


def _json(description: str, schema: Doc) -> Doc:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Doc:
    return _json(description, _ref("Error"))


IDEMPOTENCY_KEY: Doc = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Makes a retry safe: the same key with the same body gets the first answer again "
        "(with `Idempotent-Replayed: true`) and writes nothing; with another body, 422. "
        "Kept 24 hours."
    ),
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"},
}
# A POST with the page's cookie needs its CSRF token too.
ACTING: list[Doc] = [{"bearer": []}, {"cookie": [], "csrf": []}]
MESSAGE_ID: Doc = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
REFUSED: Doc = {
    "400": _error("The body is not JSON, or not the request's shape; `problems` name the fields."),
    "401": _error("No session cookie and no bearer token, or a wrong one."),
    "403": _error("A cookie without this page's X-CSRF-Token, or another site's Origin."),
    "409": _error("The first request with this Idempotency-Key is still being answered."),
    "413": _error(f"The body is over {web.API_BODY_BYTES // 2**20} MiB."),
    "422": _error("Nothing was written: `problems` names each field that is wrong."),
    "429": _error("Too many failed log-ins from this address: see Retry-After."),
    "503": _error("MongoDB is unavailable."),
}
MESSAGE: Doc = {
    "type": "object",
    "additionalProperties": False,
    "required": ["to"],
    "properties": {
        "to": {
            "type": ["string", "integer"],
            "description": "a phone number in international form, or a WhatsApp chat id",
        },
        "text": {"type": "string", "description": "the text (an image's caption)"},
        "at": {
            "type": "string",
            "description": "when: ISO 8601; without an offset, in TIMEZONE. Default: now",
        },
        "in": {"type": "string", "description": "instead of `at`: 30s, 10m, 2h, 1d from now"},
        "session": {"type": "string", "default": "default", "description": "the WAHA session"},
        "priority": {"type": "number", "description": "higher goes first in its session"},
        "image": {"type": "string", "description": "an http(s) URL of an image"},
    },
}
VIEW: Doc = {
    "type": "object",
    "required": ["id", "status", "final"],
    "properties": {
        "id": ID,
        "status": {
            "type": "string",
            "description": (
                "waiting (no poller has seen it yet), planned (for plannedAt), claimed, "
                "sending, retry, pending; at the end sent, failed, expired, unknown, "
                "cancelled, or done (the web app marked it done or handles it itself)"
            ),
        },
        "final": {"type": "boolean", "description": "whether it has ended"},
        "chatId": _or_null({"type": "string"}),
        "session": _or_null({"type": "string"}),
        "campaignId": _or_null({"type": "string"}),
        "scheduledAt": _or_null(DATE),
        "plannedAt": _or_null(DATE),
        "slotAt": _or_null(DATE),
        "sentAt": _or_null(DATE),
        "finishedAt": _or_null(DATE),
        "lastError": _or_null({"type": "string"}),
        "ack": _or_null({"type": "integer", "description": "the highest delivery receipt"}),
    },
}
CAMPAIGN: Doc = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "text"],
    "properties": {
        "name": {"type": "string", "description": "the campaign's name; with the session, its key"},
        "text": {"type": "string", "description": "the template: {column} for a row's value"},
        "recipients": {
            "type": "array",
            "description": "one object per recipient: its phone (or chatId) and the columns",
            "items": {
                "type": "object",
                "additionalProperties": {"type": ["string", "integer", "null"]},
            },
        },
        "csv": {"type": "string", "description": "instead of recipients: a CSV file's text"},
        "column": {"type": "string", "description": "the recipient's column, when not phone"},
        "at": MESSAGE["properties"]["at"],
        "in": MESSAGE["properties"]["in"],
        "session": MESSAGE["properties"]["session"],
        "priority": MESSAGE["properties"]["priority"],
        "dryRun": {"type": "boolean", "default": False, "description": "check and plan only"},
    },
}
SESSION_PLAN: Doc = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "integer"},
        "first": DATE,
        "last": DATE,
        "notSending": {"type": "string", "description": "why the session cannot send"},
    },
}
PREVIEW: Doc = {
    "type": "object",
    "required": ["messages", "sessions", "eta"],
    "properties": {
        "messages": {"type": "integer"},
        "sessions": {"type": "object", "additionalProperties": _ref("SessionPlan")},
        "eta": _or_null(DATE),
    },
}
CAMPAIGN_ANSWER: Doc = {
    "type": "object",
    "required": ["dryRun", "campaign", "name", "messages", "preview"],
    "properties": {
        "dryRun": {"type": "boolean"},
        "campaign": ID,
        "name": {"type": "string"},
        "messages": {"type": "integer", "description": "the campaign's messages"},
        "written": {"type": "integer", "description": "those new (not written before)"},
        "new": {"type": "boolean", "description": "whether the campaign itself was new"},
        "preview": _ref("Preview"),
    },
}
ERROR: Doc = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "problems": {"type": "array", "items": {"type": "string"}},
        "message": _ref("MessageView"),
    },
}

SPEC: Doc = {
    "openapi": "3.1.0",
    "info": {
        "title": "poller",
        "version": __version__,
        "description": (
            "Schedule WhatsApp messages and campaigns, and watch them, on poller's dashboard "
            "server. Dates are ISO 8601 in UTC."
        ),
    },
    "security": [{"bearer": []}, {"cookie": []}],
    "paths": {
        "/api/openapi.json": {
            "get": {
                "summary": "This description",
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"}), **REFUSED},
            }
        },
        "/api/status": {
            "get": {
                "summary": "The dashboard's picture (poller status --json, and the activity)",
                "parameters": [
                    {"name": name, "in": "query", "schema": {"type": "string"}}
                    for name in ("window", "chatId", "campaign")
                ],
                "responses": {"200": _json("The picture", {"type": "object"}), **REFUSED},
            }
        },
        "/api/messages": {
            "post": {
                "security": ACTING,
                "summary": "Schedule one message, or many (all checked before any is written)",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    _ref("Message"),
                                    {"type": "array", "items": _ref("Message")},
                                    {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["messages"],
                                        "properties": {
                                            "messages": {"type": "array", "items": _ref("Message")}
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        "Written: their ids and views",
                        {
                            "type": "object",
                            "required": ["ids", "messages"],
                            "properties": {
                                "ids": {"type": "array", "items": ID},
                                "messages": {"type": "array", "items": _ref("MessageView")},
                            },
                        },
                    ),
                    **REFUSED,
                },
            }
        },
        "/api/messages/{id}": {
            "get": {
                "summary": "A message as the poller has it",
                "parameters": [MESSAGE_ID],
                "responses": {
                    "200": _json("The message", _ref("MessageView")),
                    **REFUSED,
                    "400": _error("The id is not 24 hex digits."),
                    "404": _error("No message has this id."),
                },
            }
        },
        "/api/messages/{id}/cancel": {
            "post": {
                "security": ACTING,
                "summary": "Cancel a message that is still waiting",
                "parameters": [MESSAGE_ID],
                "responses": {
                    "200": _json("Cancelled", _ref("MessageView")),
                    **REFUSED,
                    "400": _error("The id is not 24 hex digits."),
                    "404": _error("No message has this id."),
                    "409": _error("It is being sent or has ended: `error` says which."),
                },
            }
        },
        "/api/campaigns": {
            "post": {
                "security": ACTING,
                "summary": "A campaign from recipients or a CSV text: a dry run, or written",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Campaign")}},
                },
                "responses": {
                    "200": _json("The dry run: nothing written", _ref("CampaignAnswer")),
                    "201": _json("Written", _ref("CampaignAnswer")),
                    **REFUSED,
                },
            }
        },
        "/api/campaigns/{id}/{action}": {
            "post": {
                "security": ACTING,
                "summary": "Pause, resume or cancel an open campaign",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["pause", "resume", "cancel"]},
                    },
                ],
                "responses": {
                    "200": _json(
                        "Its new status",
                        {
                            "type": "object",
                            "required": ["campaign", "status"],
                            "properties": {
                                "campaign": {"type": "string"},
                                "status": {"enum": ["paused", "running", "cancelled"]},
                            },
                        },
                    ),
                    **REFUSED,
                    "404": _error("No open campaign has this id (or it cannot take the action)."),
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "DASHBOARD_TOKEN"},
            "cookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": "poller_dashboard",
                "description": "the session the log-in form sets (the page's own calls)",
            },
            "csrf": {
                "type": "apiKey",
                "in": "header",
                "name": "X-CSRF-Token",
                "description": "with the cookie, on every POST: `csrf` of GET /api/status",
            },
        },
        "schemas": {
            "Message": MESSAGE,
            "MessageView": VIEW,
            "Campaign": CAMPAIGN,
            "CampaignAnswer": CAMPAIGN_ANSWER,
            "Preview": PREVIEW,
            "SessionPlan": SESSION_PLAN,
            "Error": ERROR,
        },
    },
}
