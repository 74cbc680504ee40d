"""Paired comparison of two models certified on the same test images (`report.compare`): counts, p-values and
intervals on a hand-made pair of files where they are known.

`report --paired`, the demo's table and several models under one Holm family: tests/e2e/test_cli_report_paired.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CERTIFY_HEADER, PAIRED_A

from smoothadv.errors import SmoothAdvError
from smoothadv.report import certified_by_image, compare, describe_comparison, format_comparison, load_results


def test_compare_counts_the_discordant_images_and_tests_them(paired_files: tuple[Path, Path]) -> None:
    comparison = compare(load_results(paired_files[0]), load_results(paired_files[1]), [0.0, 0.5], ("A", "B"))
    assert comparison.count == 5
    assert [v for pair in comparison.accuracy for v in pair] == pytest.approx([0.6, 0.8, 0.2, 0.8])
    # r = 0: only A certifies idx 4, only B idx 2 and 3; r = 0.5: only B certifies idx 1, 2, 3
    assert comparison.only == ((1, 2), (0, 3))
    assert comparison.pvalues == pytest.approx((1.0, 0.25))  # 2 P(Bin(3, 1/2) <= 1) (capped), 2 / 8
    assert comparison.adjusted == pytest.approx((1.0, 0.5))  # Holm: 2 x 0.25, then max(0.5, 1.0)
    assert comparison.better(0) is None and comparison.better(1) is None
    # ACR: A 0.18, B 0.48; paired differences 0.1, 0.5, 0.6, 0.6, -0.3: mean 0.3 +- t(0.975, 4) s / sqrt(5)
    assert comparison.acr == pytest.approx((0.18, 0.48))
    assert comparison.acr_difference == pytest.approx((0.3, -0.188844, 0.788844), abs=1e-6)
    assert comparison.better_acr() is None
    markdown = format_comparison(comparison)
    assert "| r = 0.5 | 20.0 | 80.0 | +60.0 | 0 | 3 | 0.2500 | 0.5000 | – |" in markdown
    assert "| ACR | 0.180 | 0.480 | +0.300 [-0.189, +0.789] |  |  |  |  | – |" in markdown
    assert "no radius shows a supported difference" in describe_comparison(comparison)
    assert format_comparison(comparison, "csv").splitlines()[2] == "0.5,0.200000,0.800000,0.600000,,,0,3,0.25,0.5,"


def test_certified_by_image_aligns_files_by_idx(paired_files: tuple[Path, Path]) -> None:
    """Rows in increasing idx whatever the file order; abstained (idx 2) and wrong (idx 3) never certified."""
    a, b = (load_results(path) for path in paired_files)
    assert certified_by_image(a, [0.0, 0.5]).tolist() == [[True, True], [True, False], [False, False],
                                                          [False, False], [True, False]]
    assert certified_by_image(b, [0.0, 0.6, 0.7]).tolist() == [[True, True, False]] * 4 + [[False, False, False]]


def test_a_supported_difference_is_named(tmp_path: Path) -> None:
    rows = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    # 12 images: B certifies all at 0.5, A none; at r = 0 both are right on all
    a.write_text("\n".join(rows + [f"{i}\t0\t0\t0.1\t1\t0:00:01" for i in range(12)]) + "\n")
    b.write_text("\n".join(rows + [f"{i}\t0\t0\t0.6\t1\t0:00:01" for i in range(12)]) + "\n")
    comparison = compare(load_results(a), load_results(b), [0.0, 0.5], ("A", "B"))
    assert comparison.only == ((0, 0), (0, 12)) and comparison.pvalues == pytest.approx((1.0, 2 / 2**12))
    assert comparison.better(1) == "B" and comparison.better(0) is None and comparison.better_acr() == "B"
    assert describe_comparison(comparison).startswith("Paired over the same 12 test images")
    assert "B certifies more than A at r = 0.5; at r = 0 the difference is within" in describe_comparison(comparison)


def test_compare_refuses_files_of_different_images(paired_files: tuple[Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "c.tsv"
    other.write_text(CERTIFY_HEADER + "".join(r + "\n" for r in PAIRED_A[:4]))
    with pytest.raises(SmoothAdvError, match="different test images"):
        compare(load_results(paired_files[0]), load_results(other), [0.0])
