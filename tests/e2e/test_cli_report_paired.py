"""`smoothadv report --paired` through the command line: what it prints is the demo's table, its one-line refusal of
a single input, and several models compared with the first under one Holm family.

The inputs are the hand-made pair of files of tests/unit/test_report_paired.py (the `paired_files` fixture of
tests/conftest.py), where the counts, p-values and intervals are known; that file checks the library calls behind
the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoothadv.cli import main
from smoothadv.demo import demo_table
from smoothadv.errors import SmoothAdvError
from smoothadv.report import compare, compare_to_first, describe_comparison, load_results


def test_demo_table_has_the_intervals_and_the_paired_comparison(paired_files: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    certify = {"gaussian": load_results(paired_files[0]), "smoothadv": load_results(paired_files[1])}
    table = demo_table(certify, {}, [0.0, 0.5])
    # 3 of 5 and 1 of 5 (A), 4 of 5 (B): the exact 95% Clopper-Pearson intervals
    assert "| gaussian | 60.0 [14.7, 94.7] | 20.0 [0.5, 71.6] | 0.180 | 20.0 |" in table
    assert "| smoothadv | 80.0 [28.4, 99.5] | 80.0 [28.4, 99.5] | 0.480 | 0.0 |" in table
    assert "| r = 0 | 60.0 | 80.0 | +20.0 | 1 | 2 | 1.0000 | 1.0000 | – |" in table
    assert table.endswith(describe_comparison(
        compare(certify["gaussian"], certify["smoothadv"], [0.0, 0.5], ("gaussian", "smoothadv"))))
    # ... which is what `smoothadv report --ci --paired` prints
    assert main(["report", f"gaussian={paired_files[0]}", f"smoothadv={paired_files[1]}", "--radii", "0", "0.5",
                 "--ci", "--paired"]) == 0
    assert capsys.readouterr().out == table
    assert main(["report", f"A={paired_files[0]}", "--paired"]) == 2
    assert "--paired compares certify inputs with the first one, got 1 input" in capsys.readouterr().err


def test_several_models_are_compared_with_the_first_under_one_holm_family(paired_files: tuple[Path, Path],
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # C is a copy of B; 2 comparisons x 2 radii make a family of 4 tests. p-values: A-B (1.0, 0.25) and A-C the
    # same; sorted 0.25, 0.25, 1, 1, Holm gives 4 x 0.25 = 1.0, max(1.0, 3 x 0.25) = 1.0, then 1, 1
    c = tmp_path / "c.tsv"
    c.write_text(paired_files[1].read_text())
    results = {"A": load_results(paired_files[0]), "B": load_results(paired_files[1]), "C": load_results(c)}
    comparisons = compare_to_first(results, [0.0, 0.5])
    assert [x.names for x in comparisons] == [("A", "B"), ("A", "C")]
    assert all(x.family == 4 and x.pvalues == pytest.approx((1.0, 0.25)) for x in comparisons)
    assert all(x.adjusted == pytest.approx((1.0, 1.0)) for x in comparisons)
    # two models: the same as compare (Holm over the radii only)
    single = compare_to_first({"A": results["A"], "B": results["B"]}, [0.0, 0.5])
    assert single == [compare(results["A"], results["B"], [0.0, 0.5], ("A", "B"))] and single[0].family == 2
    # a supported difference survives the wider family: 12 images, B certifies all at 0.5 and A none
    rows = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    paths = {}
    for name, radius in (("A", 0.1), ("B", 0.6), ("C", 0.1)):
        paths[name] = tmp_path / f"{name}12.tsv"
        paths[name].write_text("\n".join(rows + [f"{i}\t0\t0\t{radius}\t1\t0:00:01" for i in range(12)]) + "\n")
    ab, ac = compare_to_first({k: load_results(v) for k, v in paths.items()}, [0.0, 0.5])
    # p-values (1, 2^-11) and (1, 1): Holm over 4 -> 4 x 2^-11 for B at 0.5
    assert ab.adjusted == pytest.approx((1.0, 4 * 2 / 2**12)) and ab.better(1) == "B" and ac.better(1) is None
    assert "Holm-adjusted over all 4 tests of the models against A" in describe_comparison(ab)
    assert "not adjusted for multiplicity" in describe_comparison(ab)
    assert main(["report", *[f"{k}={v}" for k, v in paths.items()], "--radii", "0", "0.5", "--paired"]) == 0
    out = capsys.readouterr().out
    assert out.count("Paired over the same 12 test images") == 2 and "B certifies more than A at r = 0.5" in out


def test_paired_files_of_other_data_are_refused_by_their_labels_and_their_recorded_digests(
        paired_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = paired_files
    relabelled = tmp_path / "relabelled.tsv"  # B's images with another label on image 3: other data
    relabelled.write_text(b.read_text().replace("3\t4\t4\t0.6\t1", "3\t9\t4\t0.6\t0"))
    with pytest.raises(SmoothAdvError, match="give different labels to the same test images"):
        compare(load_results(a), load_results(relabelled), [0.0], ("A", "B"))
    assert main(["report", f"A={a}", f"B={relabelled}", "--paired"]) == 2
    assert "different labels" in capsys.readouterr().err
    # the same images and labels, but the sidecars say they were read from other data
    selection = {"command": "certify", "split": "test", "dataset_size": 10, "skip": 2, "max": 5}
    Path(f"{a}.args.json").write_text(json.dumps({**selection, "data_sha256": "5:" + "a" * 64}))
    Path(f"{b}.args.json").write_text(json.dumps({**selection, "data_sha256": "5:" + "b" * 64}))
    assert main(["report", f"A={a}", f"B={b}", "--paired"]) == 2
    err = capsys.readouterr().err
    assert "select the same test images but were computed on different data" in err and err.count("\n") == 1
    assert main(["report", f"A={a}", f"B={b}"]) == 0  # without --paired nothing is paired, nothing compared
    Path(f"{b}.args.json").write_text(json.dumps({**selection, "skip": 3, "data_sha256": "5:" + "b" * 64}))
    assert main(["report", f"A={a}", f"B={b}", "--paired"]) == 0  # another selection: its digest is another one
    Path(f"{b}.args.json").write_text(json.dumps({**selection, "data_sha256": "5:" + "a" * 64}))
    assert main(["report", f"A={a}", f"B={b}", "--paired"]) == 0
