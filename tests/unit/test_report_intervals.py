"""`smoothadv report --ci`: 95% Clopper-Pearson intervals over test images on certified accuracies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta

from smoothadv.cli import main
from smoothadv.report import OUTSIDE_NOTE, format_table, load_published, load_results, summarize
from smoothadv.stats import clopper_pearson_interval, clopper_pearson_lower, clopper_pearson_upper

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
# correct with radius 0.5, 0.1, 0.3; one abstention; one wrong: 3 of 5 at r = 0, 1 of 5 at r = 0.5, 0 at r = 1
ROWS = ["0\t1\t1\t0.5\t1\t0:00:01", "1\t2\t2\t0.1\t1\t0:00:01", "2\t3\t-1\t0.0\t0\t0:00:01",
        "3\t4\t5\t0.8\t0\t0:00:01", "4\t0\t0\t0.3\t1\t0:00:01"]


def test_clopper_pearson_interval_matches_the_beta_quantiles_and_the_one_sided_bounds() -> None:
    low, high = clopper_pearson_interval(np.array([0, 1, 3, 5]), 5)
    assert low[0] == 0.0 and high[-1] == 1.0
    assert high[0] == pytest.approx(1 - 0.025 ** (1 / 5)) and low[-1] == pytest.approx(0.025 ** (1 / 5))
    assert low[2] == pytest.approx(beta.ppf(0.025, 3, 3)) and high[2] == pytest.approx(beta.ppf(0.975, 4, 2))
    assert (low[2], high[2]) == pytest.approx((0.146633, 0.947255), abs=1e-6)  # the exact interval for 3 of 5
    for i, k in ((1, 1), (2, 3)):  # each end is the one-sided bound at 2.5%
        assert low[i] == pytest.approx(clopper_pearson_lower(k, 5, 0.025))
        assert high[i] == pytest.approx(clopper_pearson_upper(k, 5, 0.025))
    # 400 of 500 images: about +-3.6 pp
    low, high = clopper_pearson_interval(400, 500)
    assert 0.76 < float(low) < 0.765 and 0.83 < float(high) < 0.835
    with pytest.raises(ValueError):
        clopper_pearson_interval(6, 5)


def test_report_ci_adds_intervals_to_every_certified_cell(tmp_path: Path) -> None:
    tsv = tmp_path / "a.tsv"
    tsv.write_text(HEADER + "".join(r + "\n" for r in ROWS))
    table = summarize({"A": load_results(tsv)}, [0.0, 0.5, 1.0], ci=True)
    (row,) = table.rows
    assert row.values == pytest.approx((0.6, 0.2, 0.0))
    expected = [clopper_pearson_interval(k, 5) for k in (3, 1, 0)]
    assert [v for pair in row.intervals for v in pair] == pytest.approx([float(v) for pair in expected for v in pair])
    markdown = format_table(table, "markdown")
    assert "| A | 60.0 [14.7, 94.7] | 20.0 [0.5, 71.6] | 0.0 [0.0, 52.2] |" in markdown
    assert r"60.0 {\scriptsize [14.7, 94.7]}" in format_table(table, "latex")
    csv = format_table(table, "csv").splitlines()
    assert csv[0].endswith("0 ci_low,0 ci_high,0.5 ci_low,0.5 ci_high,1 ci_low,1 ci_high")
    assert csv[1].split(",")[-6:-4] == [f"{expected[0][0]:.6f}", f"{expected[0][1]:.6f}"]
    assert summarize({"A": load_results(tsv)}, [0.0]).rows[0].intervals is None  # off by default
    # the command line, with the plot's band
    out = tmp_path / "table.md"
    assert main(["report", f"A={tsv}", "--radii", "0", "0.5", "1", "--ci", "--out", str(out),
                 "--plot", str(tmp_path / "plot.png")]) == 0
    assert "60.0 [14.7, 94.7]" in out.read_text() and (tmp_path / "plot.png").stat().st_size > 0


def test_published_rows_come_from_a_recipe_and_are_marked_outside_the_interval(tmp_path: Path, capsys) -> None:
    tsv = tmp_path / "a.tsv"
    tsv.write_text(HEADER + "".join(r + "\n" for r in ROWS))
    recipe = tmp_path / "recipe.toml"
    # measured: 3/5 [14.7, 94.7] at 0, 1/5 [0.5, 71.6] at 0.5, 0/5 [0, 52.2] at 1; published 0.9, 0.8 (outside), 0.0
    recipe.write_text('sigma = 0.25\n[paper]\nsource = "a paper"\nradii = [0.0, 0.5, 1.0, 2.0]\n'
                      'certified = [0.9, 0.8, 0.0, 0.0]\nacr = 0.5\n')
    published = {"A": load_published(recipe)}
    assert published["A"].at(0.5) == 0.8 and published["A"].at(0.25) is None
    table = summarize({"A": load_results(tsv)}, [0.0, 0.25, 0.5, 1.0], ci=True, published=published)
    measured, paper = table.rows
    assert paper.name == "A (published)" and paper.kind == "published"
    assert paper.values == (0.9, None, 0.8, 0.0) and paper.acr == 0.5
    assert paper.outside == (False, False, True, False)
    markdown = format_table(table, "markdown")
    assert "| A (published) | 90.0 | – | 80.0 † | 0.0 | 0.500 |  |" in markdown
    assert markdown.rstrip().endswith(OUTSIDE_NOTE)
    assert r"80.0$^\dagger$" in format_table(table, "latex")
    # without --ci nothing is marked; a published row without a measured one is listed after the measured rows
    plain = summarize({"A": load_results(tsv)}, [0.0], published={"A": published["A"], "B": published["A"]})
    assert [(r.name, r.outside) for r in plain.rows] == [("A", None), ("A (published)", None), ("B (published)", None)]
    out = tmp_path / "table.md"
    assert main(["report", f"A={tsv}", "--radii", "0", "0.5", "--ci", "--published", f"A={recipe}", "--out", str(out),
                 "--plot", str(tmp_path / "plot.png")]) == 0
    assert "| A (published) | 90.0 | 80.0 † |" in out.read_text()
    # a [paper] label names a published model that is not the recipe's own; the row keeps its place under A
    recipe.write_text(recipe.read_text().replace("[paper]\n", '[paper]\nlabel = "A stronger"\n'))
    assert load_published(recipe).label == "A stronger"
    assert main(["report", f"A={tsv}", "--radii", "0", "0.5", "--ci", "--published", f"A={recipe}", "--out", str(out),
                 "--force"]) == 0
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| A |") and lines[3].startswith("| A stronger (published) | 90.0 | 80.0 † |")
    # a recipe without published numbers, or with malformed ones: one line, exit 2
    for text, message in (("sigma = 0.25\n", "has no [paper] section"),
                          ("[paper]\nradii = [0.0, 0.5]\ncertified = [0.9]\n", "two equally long"),
                          ("[paper]\nradii = [0.0]\ncertified = [90]\n", "fractions in [0, 1]"),
                          ('[paper]\nlabel = ""\nradii = [0.0]\ncertified = [0.9]\n', "label must be a non-empty")):
        recipe.write_text(text)
        assert main(["report", f"A={tsv}", "--published", f"A={recipe}"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
