"""`smoothadv demo --quick --dataset synthetic` end to end: the run folder, its numbers, and step reuse (by `fit`'s
and `run_evaluation`'s own resumption: the demo keeps no cache)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smoothadv.cli import main
from smoothadv.demo import demo_table
from smoothadv.evaluate import ATTACK_COLUMNS, CERTIFY_COLUMNS
from smoothadv.report import format_table, load_results, summarize
from smoothadv.stats import clopper_pearson_interval

STEPS = ["train gaussian", "train smoothadv", "certify gaussian", "attack gaussian", "certify smoothadv",
         "attack smoothadv"]


def run(out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, dict[str, str]]:
    assert main(["demo", "--quick", "--dataset", "synthetic", "--out", str(out), "--no-progress", *extra]) == 0
    text = capsys.readouterr().out
    status = {step: re.search(rf"^  {step}\s+(\w+)", text, re.M).group(1) for step in STEPS}  # type: ignore[union-attr]
    return text, status


def rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "run"


def test_demo_quick_synthetic_end_to_end(first_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, status = run(first_run, capsys)
    assert set(status.values()) == {"ran"}
    for name in ("gaussian", "smoothadv"):
        certify = rows(first_run / f"certify_{name}.tsv")
        assert tuple(certify[0]) == CERTIFY_COLUMNS and len(certify) == 1 + 100  # --quick certifies 100 images
        attack = rows(first_run / f"attack_{name}.tsv")
        assert tuple(attack[0]) == ATTACK_COLUMNS and len(attack) == 1 + 3 * 20  # 20 images at eps = 0, sigma, 2 sigma
        assert sorted({float(r[4]) for r in attack[1:]}) == [0.0, 0.25, 0.5]
        assert all(float(r[5]) <= float(r[4]) + 1e-6 for r in attack[1:])  # ||x_adv - x|| <= eps
        assert (first_run / name / "checkpoint.pth.tar").is_file()
    # the printed and written table is exactly what `smoothadv report` computes from the TSVs
    certify = {n: load_results(first_run / f"certify_{n}.tsv") for n in ("gaussian", "smoothadv")}
    attack = {n: load_results(first_run / f"attack_{n}.tsv") for n in ("gaussian", "smoothadv")}
    radii = [0.0, 0.125, 0.25, 0.375, 0.5]  # sigma/2 steps up to the largest radius n = 500 can certify (0.551)
    table = demo_table(certify, attack, radii)
    assert table.startswith(format_table(summarize(certify, radii, attack=attack, ci=True), "markdown"))
    assert (first_run / "table.md").read_text() == table
    # each certified cell carries the 95% Clopper-Pearson interval of its count over the 100 images
    count = int(sum(certify["gaussian"].correct))
    low, high = clopper_pearson_interval(count, 100)
    assert f"| gaussian | {count:.1f} [{100 * float(low):.1f}, {100 * float(high):.1f}] |" in table
    assert "Paired over the same 100 test images" in table
    assert table.strip() in text
    report = (first_run / "report.md").read_text()
    assert table.strip() in report and "![certified and empirical accuracy](accuracy.png)" in report
    assert "smoothadv report gaussian=" in report and "--ci --paired" in report
    assert (first_run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"report: {first_run / 'report.md'}" in text
    assert not (first_run / "steps.json").exists()  # no cache of its own


def test_demo_rerun_reuses_resumes_and_redoes_only_what_changed(first_run: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.read_bytes() for p in first_run.glob("*.tsv")}
    checkpoint = (first_run / "gaussian" / "checkpoint.pth.tar").read_bytes()
    _, status = run(first_run, capsys)
    assert set(status.values()) == {"reused"}
    assert {p.name: p.read_bytes() for p in first_run.glob("*.tsv")} == before
    assert (first_run / "gaussian" / "checkpoint.pth.tar").read_bytes() == checkpoint

    # an interrupted certification (TSV cut after 10 rows) is resumed, with the same rows
    tsv = first_run / "certify_gaussian.tsv"
    tsv.write_text("\n".join(tsv.read_text().splitlines()[:11]) + "\n")
    _, status = run(first_run, capsys)
    assert status["certify gaussian"] == "resumed"
    assert [s for step, s in status.items() if step != "certify gaussian"] == ["reused"] * 5
    without_time = [r[:-1] for r in rows(tsv)]
    assert without_time == [line.split("\t")[:-1] for line in before[tsv.name].decode().splitlines()]

    # changing n re-certifies both models but reuses the models and the attacks
    _, status = run(first_run, capsys, "--n", "300")
    assert status == {"train gaussian": "reused", "train smoothadv": "reused", "certify gaussian": "ran",
                      "attack gaussian": "reused", "certify smoothadv": "ran", "attack smoothadv": "reused"}


def test_demo_report_only_rebuilds_the_report_from_the_tsvs(first_run: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    table = (first_run / "table.md").read_text()
    gaussian = first_run / "gaussian" / "checkpoint.pth.tar"
    gaussian.write_bytes((first_run / "smoothadv" / "checkpoint.pth.tar").read_bytes())  # another model there
    assert main(["demo", "--quick", "--dataset", "synthetic", "--out", str(first_run), "--report-only", "--n", "300",
                 "--no-progress"]) == 2
    assert "certify_gaussian.tsv was made with other settings (checkpoint_sha256" in capsys.readouterr().err
    for name in ("table.md", "report.md", "accuracy.png"):
        (first_run / name).unlink()
    for name in ("gaussian", "smoothadv"):  # no model is needed (the committed run has none)
        (first_run / name / "checkpoint.pth.tar").unlink()
    _, status = run(first_run, capsys, "--n", "300", "--report-only")  # the flags of the last run
    assert set(status.values()) == {"reused"}
    assert (first_run / "table.md").read_text() == table
    assert "`smoothadv demo --report-only` from the TSVs" in (first_run / "report.md").read_text()
    assert (first_run / "accuracy.png").is_file()
    # the flags of another run are refused, naming what differs
    assert main(["demo", "--quick", "--dataset", "synthetic", "--out", str(first_run), "--report-only"]) == 2
    error = capsys.readouterr().err
    assert "cannot rebuild the report" in error and "n: 300 != 500" in error
    assert main(["demo", "--quick", "--dataset", "synthetic", "--out", str(first_run), "--report-only", "--n", "300",
                 "--epochs", "2"]) == 2
    assert "gaussian was trained with other settings (epochs: 1 != 2" in capsys.readouterr().err


def test_demo_settings_are_typed_and_the_flags_come_from_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from smoothadv import demo
    from smoothadv.errors import SmoothAdvError

    with pytest.raises(SmoothAdvError, match="--n must be an integer, got 1.5"):
        demo.DemoConfig(n=1.5)
    with pytest.raises(SmoothAdvError, match="--sigma must be a number > 0"):
        demo.DemoConfig(sigma=0)
    with pytest.raises(SmoothAdvError, match="--dataset must be one of"):
        demo.DemoConfig(dataset="mnist")
    seen: list[demo.DemoConfig] = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--quick", "--dataset", "synthetic", "--n", "300", "--no-progress", "--report-only"]) == 0
    (cfg,) = seen
    # --quick's values, the synthetic set in full, the flags given, the settings' defaults otherwise
    assert (cfg.epochs, cfg.certify, cfg.n, cfg.attack_count, cfg.attack_steps, cfg.train_subset) == (1, 100, 300, 20,
                                                                                                     10, None)
    assert (cfg.out, cfg.sigma, cfg.progress, cfg.report_only, cfg.fresh) == (Path("runs/demo"), 0.25, False, True,
                                                                             False)
    assert main(["demo", "--certify", "0"]) == 2


def test_demo_never_overwrites_files_it_did_not_write(first_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("# my own notes\n")
    argv = ["demo", "--quick", "--dataset", "synthetic", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "report.md was not written by the demo; pass --force" in err, err
    assert (out / "report.md").read_text() == "# my own notes\n" and sorted(p.name for p in out.iterdir()) == [
        "report.md"]
    (out / "report.md").unlink()
    (out / "certify_gaussian.tsv").write_text("idx\tlabel\n0\t1\n")  # a TSV without its settings sidecar
    assert main(argv) == 2
    assert "certify_gaussian.tsv was not written by the demo" in capsys.readouterr().err
    assert (out / "certify_gaussian.tsv").read_text() == "idx\tlabel\n0\t1\n"
