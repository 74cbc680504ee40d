"""`smoothadv report` through the command line: the table and the plot, one line per bad file, the training-cost
columns (`--cost`), the intervals and the published rows (`--ci`, `--published`) and the radius figure
(`--radius-cdf`), each with its one-line refusals.

The inputs are the hand-made TSVs of the unit tests of the library calls behind the command
(tests/unit/test_report.py, test_report_cost.py, test_report_intervals.py, test_report_radius_cdf.py), shared with
them through tests/conftest.py or copied here, so the numbers they print are known.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CERTIFY_HEADER, PAIRED_A, cost_inputs, write_cdf_tsv, write_rows

from smoothadv.cli import main
from smoothadv.errors import SmoothAdvError
from smoothadv.report import OUTSIDE_NOTE, format_table, load_costs, load_published, load_results, summarize
from smoothadv.stats import clopper_pearson_interval


def test_cli_report_writes_table_and_plot(report_files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "t.md", tmp_path / "p.png"
    assert main(["report", f"A={report_files['A']}", f"B={report_files['B']}", "--radii", "0", "0.5", "--envelope",
                 "--out", str(out), "--plot", str(png)]) == 0
    assert "| A | 60.0 | 20.0 | 0.180 | 20.0 |" in out.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(report_files["B"]), "--radii", "0.5", "--format", "csv"]) == 0
    assert "b,certified,4,0.500000,0.462500,0.250000" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    (CERTIFY_HEADER, "no rows"),
    ("a\tb\tc\n1\t2\t3\n", "not a certify/predict TSV"),
    (CERTIFY_HEADER + "0\t1\t1\t0.5\t1\n", "line 2: 5 fields"),
    (CERTIFY_HEADER + "0\t1\tcat\t0.5\t1\t0:00:01\n", "non-numeric value 'cat'"),
    (CERTIFY_HEADER + "0\t1\t1\t0.5\t1\tsoon\n", "not a duration"),
    (CERTIFY_HEADER + "0\t1\t1\t-0.5\t1\t1.0\n", "negative"),
    (CERTIFY_HEADER + "0\t1\t1\tnan\t1\t1.0\n", "non-finite"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    path = tmp_path / "bad.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SmoothAdvError, match=message):
        load_results(path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.split("'")[0] in err


# ------------------------------------------------------------------ --cost

def test_report_cost_on_the_command_line_and_its_one_line_errors(tmp_path: Path, capsys) -> None:
    paths, cost = cost_inputs(tmp_path)
    out = tmp_path / "table.md"
    assert main(["report", f"gaussian={paths['gaussian']}", f"macer={paths['macer']}", "--radii", "0", "--ci",
                 "--cost", str(cost), "--out", str(out)]) == 0
    assert "| macer | 100.0 [15.8, 100.0] | 0.300 | 0.0 | 600 | 20.00 | 1.25 |" in out.read_text()
    for text, message in (("name\tseconds\ngaussian\t3\n", "no 'cpu_s_per_epoch' column"),
                          ("name\tcpu_s_per_epoch\ngaussian\t0\n", "must be a positive number"),
                          ("name\tcpu_s_per_epoch\tmodel\ngaussian\t3\tx\n", "model must be a positive number"),
                          ("name\tcpu_s_per_epoch\ngaussian\t3\ngaussian\t4\n", "listed twice"),
                          ("name\tcpu_s_per_epoch\n", "no rows")):
        cost.write_text(text)
        assert main(["report", f"gaussian={paths['gaussian']}", "--cost", str(cost)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    with pytest.raises(SmoothAdvError, match="cannot read the cost file"):
        load_costs(tmp_path / "missing.tsv")


# ------------------------------------------------------------------ --ci and --published


def test_report_ci_adds_intervals_to_every_certified_cell(tmp_path: Path) -> None:
    tsv = tmp_path / "a.tsv"
    write_rows(tsv, CERTIFY_HEADER, PAIRED_A)  # 3 of 5 correct at r = 0, 1 of 5 at r = 0.5, 0 at r = 1
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
    write_rows(tsv, CERTIFY_HEADER, PAIRED_A)  # 3 of 5 correct at r = 0, 1 of 5 at r = 0.5, 0 at r = 1
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


# ------------------------------------------------------------------ --radius-cdf

def test_report_command_draws_the_radius_cdf(tmp_path, capsys) -> None:
    from smoothadv.cli import main

    tsv = write_cdf_tsv(tmp_path / "a.tsv")
    figure = tmp_path / "cdf.png"
    assert main(["report", f"A={tsv}", "--radius-cdf", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    before = figure.read_bytes()
    for argv, message in [
            ([f"A={tsv}", "--radius-cdf", str(figure)], "already exists"),  # no overwrite without --force
            ([f"A={tsv}", "--radius-cdf", str(tmp_path / "p.png"), "--cdf-of", "p_lower"], "needs --sigma"),
            ([f"A={tsv}", "--radius-cdf", str(tmp_path / "x.png"), "--plot", str(tmp_path / "x.png")],
             "name the same file"),
            ([f"A={tsv}", "--radius-cdf", str(tsv), "--force"], "input")]:
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert figure.read_bytes() == before and tsv.read_text().startswith("idx\t")
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "x.png").exists()
    assert main(["report", f"A={tsv}", "--radius-cdf", str(tmp_path / "p.png"), "--cdf-of", "p_lower",
                 "--sigma", "0.25"]) == 0
