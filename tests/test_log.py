"""Log set-up: secrets are masked in every line, plain or JSON. The suite's own check: each test's
log lines, and those of the processes it starts, are scanned for secrets (conftest.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger
from support import API_KEY, SECRETS, child_logs, leaked_lines

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


def test_the_scan_finds_a_secret_in_a_line() -> None:
    text = f"tick: claimed=1 sent=1\nconnecting with X-Api-Key {API_KEY}\nstopped\n"
    assert leaked_lines(text, SECRETS) == [f"connecting with X-Api-Key {API_KEY}"]
    assert leaked_lines(text.replace(API_KEY, "***"), SECRETS) == []
    assert leaked_lines(text, ["", "nothing"]) == [], "an empty secret (no key) matches nothing"


def stderr_of_a_child(folder: Path, line: str) -> None:
    """A Python process with POLLER_TEST_LOGS=`folder` that writes `line` to its stderr (a pipe
    here, so that only the copy in `folder` reaches this test's output)."""
    code = f"import sys; sys.stderr.write({line!r} + '\\n')"
    env = {**os.environ, "POLLER_TEST_LOGS": str(folder)}
    subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=60
    )


def test_the_stderr_of_a_process_started_by_a_test_is_scanned(tmp_path: Path) -> None:
    # A folder of this test's own, not its POLLER_TEST_LOGS: the key must not fail this test.
    stderr_of_a_child(tmp_path, f"connecting with X-Api-Key {API_KEY}")
    assert leaked_lines(child_logs(tmp_path), SECRETS) == [f"connecting with X-Api-Key {API_KEY}"]


def test_each_test_has_a_logs_folder_of_its_own() -> None:
    folder = Path(os.environ["POLLER_TEST_LOGS"])
    assert folder.is_dir() and list(folder.iterdir()) == [], "nothing from an earlier test"
    stderr_of_a_child(folder, "tick: claimed=0 sent=0")
    assert child_logs(folder) == "tick: claimed=0 sent=0\n"


def test_a_test_that_logs_a_secret_fails(tmp_path: Path) -> None:
    """conftest's report hook, driven by hand on the report of a test that logged the key."""
    import conftest

    item = type("Item", (), {"stash": pytest.Stash()})()
    item.stash[conftest.LOGS] = tmp_path
    stderr_of_a_child(tmp_path, "a child's line")

    def phase(when: str, captured: str) -> pytest.TestReport:
        report = pytest.TestReport(
            "test_x.py::test_x", ("test_x.py", 0, "test_x"), {}, "passed", None, when, []
        )
        report.sections = [(f"Captured stderr {when}", captured)]
        hook = conftest.pytest_runtest_makereport(item, None)  # type: ignore[arg-type]
        next(hook)
        with pytest.raises(StopIteration) as done:
            hook.send(report)
        result: pytest.TestReport = done.value.value
        return result

    assert phase("call", "tick: claimed=1 sent=1\n").passed
    failed = phase("call", f"connecting with X-Api-Key {API_KEY}\n")
    assert failed.failed
    assert "stderr: connecting with X-Api-Key <secret>" in str(failed.longrepr)
    assert API_KEY not in str(failed.longrepr), "the failure does not show the secret either"
    assert phase("teardown", f"connecting with X-Api-Key {API_KEY}\n").passed, "reported once"
    assert not tmp_path.exists(), "the test's folder is removed after its teardown"
