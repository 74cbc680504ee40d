"""The library behind `smoothadv report`: numbers on hand-made TSVs equal hand-computed values; formats; the plot.

The command itself (and its one line per bad file): tests/e2e/test_cli_report.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import A_ROWS, CERTIFY_HEADER, write_rows

from smoothadv.errors import SmoothAdvError
from smoothadv.report import (
    empirical_curve,
    envelope,
    format_table,
    load_results,
    merge,
    parse_seconds,
    plot_accuracy,
    recorded_seconds,
    summarize,
)

RADII = [0.0, 0.25, 0.5, 1.0, 1.5]


def test_both_time_formats_parse(report_files: dict[str, Path]) -> None:
    a, b = load_results(report_files["A"]), load_results(report_files["B"])
    assert a.kind == b.kind == "certify"
    np.testing.assert_allclose(a.seconds, [14.172309, 1.0, 1.0, 86401.0, 1.5])
    np.testing.assert_allclose(b.seconds, [15.4] * 4)
    assert parse_seconds("2:03:04.5") == 2 * 3600 + 3 * 60 + 4.5
    with pytest.raises(ValueError):
        parse_seconds("yesterday")


def test_recorded_seconds_sums_the_time_column_of_an_evaluation_or_a_training_log(report_files: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    assert recorded_seconds(report_files["A"]) == pytest.approx(14.172309 + 1 + 1 + 86401 + 1.5)
    log = write_rows(tmp_path / "log.tsv", "epoch\ttime\tlr\n", ["1\t12.5\t0.1", "2\t7.5\t0.1"])
    assert recorded_seconds(log) == 20.0
    assert recorded_seconds(tmp_path / "absent.tsv") == 0.0  # a step that has not run
    with pytest.raises(SmoothAdvError, match="has no 'time' column"):
        recorded_seconds(write_rows(tmp_path / "x.tsv", "epoch\tlr\n", ["1\t0.1"]))
    with pytest.raises(SmoothAdvError, match="column 'time': not a duration: 'soon'"):
        recorded_seconds(write_rows(tmp_path / "y.tsv", "epoch\ttime\n", ["1\tsoon"]))


def test_certified_accuracy_acr_abstention_by_hand(report_files: dict[str, Path]) -> None:
    table = summarize({"A": load_results(report_files["A"]), "B": load_results(report_files["B"])}, RADII)
    a, b = table.rows
    # A: correct radii {0.5, 0.1, 0.3} of 5 rows; B: {1.2, 0.05, 0.6} of 4 rows.
    assert a.values == pytest.approx((3 / 5, 2 / 5, 1 / 5, 0.0, 0.0))
    assert b.values == pytest.approx((3 / 4, 2 / 4, 2 / 4, 1 / 4, 0.0))
    assert a.acr == pytest.approx((0.5 + 0.1 + 0.3) / 5)
    assert b.acr == pytest.approx((1.2 + 0.05 + 0.6) / 4)
    assert (a.abstain, b.abstain) == pytest.approx((1 / 5, 1 / 4))
    assert (a.count, b.count) == (5, 4)


def test_abstention_counts_as_wrong_even_if_marked_correct(tmp_path: Path) -> None:
    res = load_results(write_rows(tmp_path / "x.tsv", CERTIFY_HEADER,
                                  ["0\t-1\t-1\t0.0\t1\t1.0", "1\t2\t2\t0.4\t1\t1.0"]))
    assert res.correct.tolist() == [0, 1]
    assert summarize({"x": res}, [0.0]).rows[0].values == (0.5,)


def test_envelope_takes_max_and_breaks_ties_by_clean_accuracy(report_files: dict[str, Path]) -> None:
    # C is listed first: at r = 1.0 it ties with B (0.25 each) but B has the higher clean accuracy (0.75 vs 0.25).
    results = {name: load_results(report_files[name]) for name in ("C", "A", "B")}
    table = summarize(results, RADII, include_envelope=True)
    row = table.rows[-1]
    assert row.kind == "envelope"
    assert row.values == pytest.approx((0.75, 0.5, 0.5, 0.25, 0.25))
    assert row.models == ("B", "B", "B", "B", "C")
    assert row.model_clean == pytest.approx((0.75, 0.75, 0.75, 0.75, 0.25))
    best, names = envelope({"x": np.array([0.5, 0.2]), "y": np.array([0.5, 0.3])}, {"x": 0.9, "y": 0.8})
    assert best.tolist() == [0.5, 0.3] and names == ["x", "y"]


def test_high_prob_rows_equal_cohens_formula(report_files: dict[str, Path]) -> None:
    res = load_results(report_files["A"])
    row = summarize({"A": res}, [0.0, 0.25], high_prob=True, alpha=0.001, rho=0.001).rows[1]
    log_term = math.log(1000)
    penalty = 0.001 + math.sqrt(0.001 * 0.999 * log_term / 5) + log_term / 15
    assert row.kind == "high-prob"
    assert row.values == pytest.approx((0.6 - penalty, 0.0))  # 0.4 - penalty < 0 is clipped to 0


def test_attack_files_give_empirical_accuracy_per_eps(tmp_path: Path) -> None:
    header = "idx\tlabel\tpredict\tcorrect\teps\tnorm\ttime\n"
    first = write_rows(tmp_path / "e25.tsv", header,
                       ["0\t1\t1\t1\t0.25\t0.25\t0:00:01", "1\t1\t2\t0\t0.25\t0.2\t0:00:01"])
    second = write_rows(tmp_path / "e50.tsv", header,
                        ["0\t1\t1\t1\t0.5\t0.5\t0:00:01", "1\t1\t-1\t0\t0.5\t0.5\t0:00:01",
                         "2\t0\t0\t1\t0.5\t0.5\t0:00:01", "3\t0\t0\t1\t0.5\t0.5\t0:00:01"])
    merged = merge([load_results(first), load_results(second)])
    assert str(merged.path) == f"{first} + {second}"  # messages about the merged rows name both files
    eps, accuracy = empirical_curve(merged)
    assert eps.tolist() == [0.25, 0.5] and accuracy == pytest.approx([0.5, 0.75])
    # Salman's predict format (extra basePredict column, no eps): a clean PREDICT run, eps = 0.
    salman = write_rows(tmp_path / "p.tsv", "idx\tlabel\tpredict\tbasePredict\tcorrect\ttime\n",
                        ["0\t1\t1\t1\t1\t0:00:01", "20\t2\t3\t2\t0\t0:00:01"])
    eps0, acc0 = empirical_curve(load_results(salman))
    assert eps0.tolist() == [0.0] and acc0.tolist() == [0.5]
    row = summarize({}, [0.0, 0.25, 0.5, 1.0], attack={"SA": merged}).rows[0]
    assert row.values == (None, 0.5, 0.75, None)
    with pytest.raises(SmoothAdvError, match="repeat"):
        merge([load_results(first), load_results(first)])


def test_formats(report_files: dict[str, Path]) -> None:
    table = summarize({"A_1": load_results(report_files["A"]), "B": load_results(report_files["B"])},
                      [0.0, 0.5], include_envelope=True)
    md = format_table(table, "markdown").splitlines()
    assert md[0] == "|  | r = 0 | r = 0.5 | ACR | abstain (%) |"
    assert md[2] == "| A_1 | 60.0 | 20.0 | 0.180 | 20.0 |"
    assert md[4] == "| envelope | 75.0 | 50.0 |  |  |"
    assert md[5] == "| envelope model (clean %) | B (75.0) | B (75.0) |  |  |"
    latex = format_table(table, "latex")
    assert latex.startswith(r"\begin{tabular}{lrrrr}") and latex.rstrip().endswith(r"\end{tabular}")
    assert r"A\_1 & 60.0 & 20.0 & 0.180 & 20.0 \\" in latex
    assert r"envelope & 75.0$^{75.0}$ & 50.0$^{75.0}$ &  &  \\" in latex
    csv_lines = format_table(table, "csv").splitlines()
    assert csv_lines[0] == "name,kind,count,0,0.5,acr,abstain_rate"
    assert csv_lines[1] == "A_1,certified,5,0.600000,0.200000,0.180000,0.200000"
    assert csv_lines[4] == "envelope model,envelope-model,,B,B,,"


def test_plot_is_a_png_with_content(report_files: dict[str, Path], tmp_path: Path) -> None:
    header = "idx\tlabel\tpredict\tcorrect\teps\tnorm\ttime\n"
    attack = write_rows(tmp_path / "att.tsv", header,
                        ["0\t1\t1\t1\t0.25\t0.25\t0:00:01", "1\t1\t2\t0\t0.5\t0.5\t0:00:01"])
    out = plot_accuracy({"A": load_results(report_files["A"]), "B": load_results(report_files["B"])},
                        tmp_path / "fig.png", attack={"A": load_results(attack)}, include_envelope=True)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    pixels = imread(out)
    assert pixels.shape[:2] == (round(4.2 * 120), round(6.4 * 120))
    assert float(pixels[..., :3].std()) > 0.05  # not a blank canvas


def test_default_radii_doubles_the_step_until_the_columns_fit(tmp_path: Path) -> None:
    from smoothadv.report import default_radii

    results = {"A": load_results(write_rows(tmp_path / "a.tsv", CERTIFY_HEADER, A_ROWS))}  # largest radius 0.8
    assert default_radii(results) == [0.0, 0.25, 0.5, 0.75]
    assert default_radii(results, step=0.1) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert default_radii(results, step=0.05, max_columns=12) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert default_radii(results, step=0.25, max_columns=2) == [0.0, 0.5]
    assert default_radii({}) == [0.0]


def test_tables_and_plots_from_certificates_in_memory(tmp_path: Path) -> None:
    """Certificates held in memory make the same table as the TSV with the same rows."""
    import torch

    from smoothadv.report import Results, format_table, plot_accuracy, summarize
    from smoothadv.sequential import SequentialCertificate
    from smoothadv.smoothing import Certificate

    certificates = [Certificate(3, 0.40, 3, 0.9, 90, 100, 100), Certificate(-1, 0.0, 2, 0.4, 40, 100, 100),
                    Certificate(5, 0.10, 5, 0.6, 60, 100, 100), Certificate(1, 0.70, 1, 0.99, 99, 100, 100)]
    labels = torch.tensor([3, 2, 4, 1])
    tsv = write_rows(tmp_path / "same.tsv", "idx\tlabel\tpredict\tradius\tcorrect\ttime\n",
                     ["0\t3\t3\t0.4\t1\t0:00:01", "1\t2\t-1\t0.0\t0\t0:00:01", "2\t4\t5\t0.1\t0\t0:00:01",
                      "3\t1\t1\t0.7\t1\t0:00:01"])
    memory = Results.from_certificates(certificates, labels)
    assert memory.correct.tolist() == [1, 0, 0, 1] and not memory.sequential
    assert memory.samples is not None and memory.samples.tolist() == [200] * 4 and load_results(tsv).samples is None
    kept = memory.restricted([3, 0, 9])  # the rows of images 0 and 3, in the file's order
    assert kept.idx.tolist() == [0, 3] and kept.radius.tolist() == [0.4, 0.7] and kept.samples.tolist() == [200, 200]
    assert load_results(tsv).restricted({2}).label.tolist() == [4] and load_results(tsv).restricted([]).idx.size == 0
    radii = [0.0, 0.25, 0.5]
    assert format_table(summarize({"A": memory}, radii, ci=True)) == \
        format_table(summarize({"A": load_results(tsv)}, radii, ci=True))
    assert plot_accuracy({"A": memory}, tmp_path / "memory.png").stat().st_size > 1000
    attacked = Results.from_predictions([3, 2, -1, 0], labels, eps=0.5)
    table = summarize({"A": memory}, [0.5], attack={"A": attacked})
    assert table.rows[-1].values == (0.5,)  # two of four right under attack
    with pytest.raises(SmoothAdvError, match="one label per certificate"):
        Results.from_certificates(certificates, labels[:3])
    with pytest.raises(SmoothAdvError, match="takes Certificate objects"):
        Results.from_certificates([(3, 0.4)], [3])
    # sequential certificates are marked: their radii are where the test stopped
    stopped = SequentialCertificate(prediction=3, radius=0.4, tested_class=3, p_lower=0.9, count=90, n0=16, n=1024,
                                    looks=1, stop="settled")
    marked = Results.from_certificates([stopped], [3])
    assert marked.sequential and marked.samples is not None and marked.samples.tolist() == [1040]
    text = format_table(summarize({"S": marked}, radii))
    assert "| S ‡ |" in text and "bound where the test stopped" in text


def test_sequential_tsvs_are_marked_in_tables(tmp_path: Path) -> None:
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tn\tmode\n"
    fixed = write_rows(tmp_path / "f.tsv", "idx\tlabel\tpredict\tradius\tcorrect\ttime\n", ["0\t1\t1\t0.3\t1\t0:00:01"])
    sequential = write_rows(tmp_path / "s.tsv", header, ["0\t1\t1\t0.3\t1\t0:00:01\t2064\tsequential/selection"])
    betting = write_rows(tmp_path / "b.tsv", header, ["0\t1\t1\t0.3\t1\t0:00:01\t880\tbetting/selection"])
    assert [load_results(p).sequential for p in (fixed, sequential, betting)] == [False, True, True]
    text = format_table(summarize({"F": load_results(fixed), "S": load_results(sequential)}, [0.25]))
    assert "| F |" in text and "| S ‡ |" in text and text.count("‡") == 2
