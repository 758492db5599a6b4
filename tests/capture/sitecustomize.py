"""Loaded at start-up by every Python process the tests start (their PYTHONPATH names this
folder): copies the process's stderr, where poller logs, to a file in $POLLER_TEST_LOGS, a folder
of the test that started it, so that the test fails if a line shows a secret (conftest.py)."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class _Tee:
    def __init__(self, stream: TextIO, copy: TextIO) -> None:
        self._stream, self._copy = stream, copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        self._copy.flush()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_folder = os.environ.get("POLLER_TEST_LOGS")
if _folder and os.path.isdir(_folder):
    _copy = open(os.path.join(_folder, f"{os.getpid()}.log"), "a", encoding="utf-8")  # noqa: SIM115
    sys.stderr = _Tee(sys.stderr, _copy)  # type: ignore[assignment]
