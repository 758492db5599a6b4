"""Log set-up: secrets are masked in every line, plain or JSON."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest
from loguru import logger
from support import SUITE_LOGS

from poller import log


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logger.remove()
    logger.configure(patcher=lambda record: None)
    logger.add(sys.stderr)
    logging.basicConfig(handlers=[logging.NullHandler()], force=True)


@pytest.mark.parametrize("as_json", [False, True])
def test_secrets_are_masked(capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    log.setup("INFO", as_json, ["key-123", "p@ss"])
    logger.info("connecting with key-123 to mongodb://u:p@ss@h/db")
    logging.getLogger("apscheduler").warning("a library said key-123")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert "key-123" not in err and "p@ss" not in err
    text = [json.loads(line)["record"]["message"] for line in lines] if as_json else lines
    assert "connecting with *** to mongodb://u:***@h/db" in text[0]
    assert "apscheduler: a library said ***" in text[1]


def test_no_secret_in_any_log_line_of_the_suite(secrets: list[str]) -> None:
    """Runs last (conftest): every line logged by the suite's poller runs, in this process or in
    the processes the tests started, without the WAHA keys or the MongoDB passwords used."""
    folder, in_process = SUITE_LOGS
    files = sorted(folder.glob("*.log"))
    if not files and not any(in_process):
        pytest.skip("no other test ran before this one")
    lines = [line for f in files for line in f.read_text(errors="replace").splitlines()]
    lines += [line for text in in_process for line in text.splitlines()]
    print(f"{len(lines)} lines from {len(files)} processes and {len(in_process)} test phases")
    if files:
        assert any("tick: claimed=" in line for line in lines), "the pollers' logs were read"
    leaked = [line for line in lines if any(secret in line for secret in secrets)]
    assert leaked == []
