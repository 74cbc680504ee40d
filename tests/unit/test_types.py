"""The package and its benchmarks type-check: mypy over src/smoothadv and benchmarks/ with the configuration in
pyproject.toml ([tool.mypy]), zero errors (the package ships py.typed, a promise to its users' type checkers; the
benchmarks call the package's API, which a rename would otherwise break unseen). Also run by pre-commit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_reports_no_error_in_the_package(tmp_path) -> None:
    pytest.importorskip("mypy")
    cache = ROOT / ".mypy_cache"
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache if cache.parent.exists()
                                                                                else tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
