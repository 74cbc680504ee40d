"""`smoothadv report` against hostile files: every case ends with exit status 2 and one `smoothadv: error:` line
saying what is wrong, and leaves every file as it was (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoothadv.cli import main

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


def tsv(path: Path, rows: list[str], sidecar: dict | None = None) -> Path:
    path.write_text(HEADER + "".join(row + "\n" for row in rows))
    if sidecar is not None:
        path.with_name(path.name + ".args.json").write_text(json.dumps(sidecar))
    return path


def recipe(path: Path, sigma: float) -> Path:
    path.write_text(f"sigma = {sigma}\n[certify]\nsigma = {sigma}\n[paper]\nradii = [0.0, 0.25]\n"
                    "certified = [0.9, 0.8]\n")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refused(argv: list[str], folder: Path, capsys: pytest.CaptureFixture[str], message: str) -> None:
    before = snapshot(folder)
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("smoothadv: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert snapshot(folder) == before


SHARD = {"command": "certify", "mode": "fixed", "sigma": 0.25, "alpha": 0.001, "n": 100, "n0": 10, "seed": 0,
         "skip": 1, "max": None, "split": "test", "batch": 100, "dataset_size": 4, "checkpoint_sha256": "ab" * 32,
         "precision": "fp32", "fold_bn": False, "normalization": None}


def test_shards_of_two_sigmas_are_not_merged_into_one_row(tmp_path, capsys) -> None:
    a = tsv(tmp_path / "out.tsv.shard-0-of-2", ["0\t1\t1\t0.3\t1\t0:00:01"], {**SHARD, "shard": [0, 2]})
    b = tsv(tmp_path / "out.tsv.shard-1-of-2", ["1\t1\t1\t0.3\t1\t0:00:01"], {**SHARD, "sigma": 0.5, "shard": [1, 2]})
    refused([f"A={a}", f"A={b}", "--out", str(tmp_path / "t.md")], tmp_path, capsys, "sigma: 0.25 != 0.5")
    # shards of one run (at different batch sizes) still merge into one row
    c = tsv(tmp_path / "ok.tsv.shard-1-of-2", ["1\t1\t1\t0.3\t1\t0:00:01"], {**SHARD, "batch": 7, "shard": [1, 2]})
    assert main(["report", f"A={a}", f"A={c}"]) == 0
    assert "| A | 100.0 |" in capsys.readouterr().out


def test_a_published_row_of_another_sigma_is_refused(tmp_path, capsys) -> None:
    measured = tsv(tmp_path / "m.tsv", ["0\t1\t1\t0.3\t1\t0:00:01"], {**SHARD})
    other = recipe(tmp_path / "paper_s1.0.toml", 1.0)
    refused([f"A={measured}", "--published", f"A={other}"], tmp_path, capsys,
            "was certified at sigma 1, the measured A at sigma 0.25")
    assert main(["report", f"A={measured}", "--published", f"A={recipe(tmp_path / 'same.toml', 0.25)}"]) == 0


@pytest.mark.parametrize(("label", "message"), [("nan", "non-numeric value 'nan'"), ("inf", "non-numeric value 'inf'"),
                                                ("1e400", "non-numeric value '1e400'")])
def test_non_finite_labels_are_one_line_errors(tmp_path, capsys, label, message) -> None:
    bad = tsv(tmp_path / "bad.tsv", [f"0\t{label}\t1\t0.3\t1\t0:00:01"])
    refused([f"A={bad}"], tmp_path, capsys, message)


def test_a_paired_comparison_of_one_image_is_refused(tmp_path, capsys) -> None:
    a = tsv(tmp_path / "a.tsv", ["0\t1\t1\t0.3\t1\t0:00:01"])
    b = tsv(tmp_path / "b.tsv", ["0\t1\t1\t0.5\t1\t0:00:01"])
    refused([f"A={a}", f"B={b}", "--paired"], tmp_path, capsys, "needs at least 2")


def test_a_huge_radius_without_radii_makes_a_short_table(tmp_path, capsys) -> None:
    big = tsv(tmp_path / "big.tsv", ["0\t1\t1\t1e12\t1\t0:00:01", "1\t1\t1\t0.1\t1\t0:00:01"])
    assert main(["report", f"A={big}"]) == 0  # in bounded memory: at most 12 radius columns
    header = capsys.readouterr().out.splitlines()[0]
    assert header.count("r = ") <= 12


def test_a_cost_file_that_is_not_text_is_refused(tmp_path, capsys) -> None:
    a = tsv(tmp_path / "a.tsv", ["0\t1\t1\t0.3\t1\t0:00:01"])
    (tmp_path / "cost.tsv").write_bytes(b"\xff\xfe\x00name")
    refused([f"A={a}", "--cost", str(tmp_path / "cost.tsv")], tmp_path, capsys, "is not a UTF-8 text TSV")


@pytest.mark.parametrize(("paper", "message"), [
    ("acr = nan", "acr must be a finite number >= 0"),
    ("acr = -1.0", "acr must be a finite number >= 0"),
    ('label = "two\\nlines"', "label must be a non-empty one-line string"),
    ("certified = [0.9, nan]", "must be"),
])
def test_malformed_published_rows_are_refused(tmp_path, capsys, paper, message) -> None:
    a = tsv(tmp_path / "a.tsv", ["0\t1\t1\t0.3\t1\t0:00:01"])
    key = paper.split(" = ")[0]
    lines = {"radii": "radii = [0.0, 0.25]", "certified": "certified = [0.9, 0.8]", key: paper}
    (tmp_path / "r.toml").write_text("[paper]\n" + "\n".join(lines.values()) + "\n")
    refused([f"A={a}", "--published", f"A={tmp_path / 'r.toml'}"], tmp_path, capsys, message)
