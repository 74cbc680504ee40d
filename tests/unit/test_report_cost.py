"""`smoothadv report --cost`: training-cost columns (CPU-s per epoch, ratio to the baseline and to the cost model).

The command line and its one-line errors: tests/e2e/test_cli_report.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cost_inputs

from smoothadv.report import COST_NOTE, format_table, load_costs, load_results, summarize


def test_cost_columns_divide_by_the_first_row_and_by_the_cost_model(tmp_path: Path) -> None:
    paths, cost = cost_inputs(tmp_path)
    costs = load_costs(cost)
    assert list(costs) == ["gaussian", "macer", "stability", "smoothmix"]
    assert costs["macer"].seconds == 600 and costs["macer"].model == 16 and costs["macer"].formula == "m"
    assert costs["stability"].model is None
    table = summarize({name: load_results(p) for name, p in paths.items()}, [0.0, 0.5], costs=costs)
    by_name = {row.name: row.cost for row in table.rows}
    assert (by_name["gaussian"].seconds, by_name["gaussian"].ratio, by_name["gaussian"].vs_model) == (30, 1.0, 1.0)
    assert by_name["macer"].ratio == pytest.approx(20.0) and by_name["macer"].vs_model == pytest.approx(1.25)
    assert by_name["stability"].ratio == pytest.approx(2.2) and by_name["stability"].vs_model is None
    assert by_name["other"] is None  # no cost listed
    markdown = format_table(table, "markdown")
    assert markdown.splitlines()[0].endswith("| ACR | abstain (%) | CPU-s / epoch | cost ratio | ratio / cost model |")
    assert "| macer | 100.0 | 50.0 | 0.300 | 0.0 | 600 | 20.00 | 1.25 |" in markdown
    assert "| stability | 100.0 | 50.0 | 0.300 | 0.0 | 66 | 2.20 | – |" in markdown
    assert "| other | 100.0 | 50.0 | 0.300 | 0.0 |  |  |  |" in markdown
    assert markdown.rstrip().endswith(COST_NOTE)
    assert "600 & 20.00 & 1.25" in format_table(table, "latex")
    csv = format_table(table, "csv").splitlines()
    assert csv[0].endswith("acr,abstain_rate,cpu_s_per_epoch,cost_ratio,cost_ratio_vs_model")
    assert csv[2].endswith(",600,20.000000,1.250000")
    # without costs the table is unchanged
    plain = format_table(summarize({"gaussian": load_results(paths["gaussian"])}, [0.0]), "markdown")
    assert "CPU-s" not in plain
