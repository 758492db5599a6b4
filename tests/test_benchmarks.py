"""The benchmarks still run: the comparison with the reference design, at its smallest sizes.
Slow (a minute or more on SecantusDB), and it needs the `bench` extras: `.ci/run` installs
them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_comparison_with_the_reference_design_still_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="needs the bench extras: pip install -e '.[bench]'")
    report = tmp_path / "benchmarks.md"  # a copy: the report and its plot are written beside it
    shutil.copy(ROOT / "docs" / "benchmarks.md", report)
    run = subprocess.run(
        [sys.executable, "benchmarks/compare.py", "--smoke", "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "messages WAHA received twice: 0" in run.stdout
