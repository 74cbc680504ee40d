"""`smoothadv validity` through the command line: the quick suite prints its table and writes its JSON summary.

The suite itself (exact answers, every certification mode keeping its level) is tested in
tests/unit/test_validity.py.
"""

from __future__ import annotations


def test_validity_command_prints_table_and_writes_json(tmp_path, capsys) -> None:
    import json

    from smoothadv.cli import main

    out = tmp_path / "validity.json"
    assert main(["validity", "--quick", "--trials", "60", "--n", "40", "--n0", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| problem | mode |" in printed and "negative controls detected: 2/2" in printed  # point estimate, 2 alpha
    summary = json.loads(out.read_text())["summary"]
    assert summary["passed"] == summary["checks"] > 10 and summary["alpha"] == 0.1
