"""Logging set-up: one loguru sink on stderr, plain or JSON, with secrets masked."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

MASK = "***"


def setup(level: str = "INFO", json: bool = False, secrets: Iterable[str] = ()) -> None:
    hidden = sorted({s for s in secrets if s}, key=len, reverse=True)

    def mask(record: Record) -> None:
        for secret in hidden:
            record["message"] = record["message"].replace(secret, MASK)

    logger.remove()
    logger.configure(patcher=mask)
    logger.add(
        sys.stderr,
        level=level,
        serialize=json,
        format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}",
        # No variable values in tracebacks: they could hold the API key or the MongoDB URI.
        backtrace=False,
        diagnose=False,
    )
    # Libraries' warnings (APScheduler: a tick ran past the next one) go through the same sink.
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.opt(depth=6).log(record.levelname, "{}: {}", record.name, record.getMessage())
