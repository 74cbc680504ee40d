"""What `smoothadv.run.write_rows` leaves on disk, at the edges of a run's life: a run that fails before its first
row leaves nothing new, one that fails after it keeps its rows for --resume, a file of unknown settings is never
extended, and a resumed file ends with its rows in job order, as an uninterrupted run writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from smoothadv import SmoothAdvError
from smoothadv.run import RunOutcome, check_radii, load_smoothed, write_rows
from smoothadv.rundir import settings_path
from smoothadv.settings import AttackRunSettings, CertifySettings, RunSettings

COLUMNS = ("idx", "value")


class _Row(NamedTuple):
    idx: int
    value: int


def _rows(todo: list) -> list:
    return [_Row(i, 2 * i) for i in todo]


def _failing_after(count: int):
    """make_rows that writes the rows of its first `count` jobs, then fails (a crash mid-run)."""
    def make_rows(todo: list):
        for i, job in enumerate(todo):
            if i == count:
                raise RuntimeError("out of memory")
            yield _Row(job, 2 * job)
    return make_rows


def _sidecars(out: Path) -> list[Path]:
    return [settings_path(out), out.parent / f"{out.name}.env.json"]


def test_a_run_failing_before_its_first_row_leaves_no_new_file(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    with pytest.raises(RuntimeError):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1], _failing_after(0), resume=False, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no sidecar, no lock


def test_a_run_failing_after_a_row_keeps_it_and_its_sidecars_for_resume(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    with pytest.raises(RuntimeError):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1, 2], _failing_after(1), resume=False, force=False)
    assert out.read_text() == "idx\tvalue\n0\t0\n"  # one row is something to resume: kept, with its record
    assert all(path.exists() for path in _sidecars(out))
    outcome = write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1, 2], _rows, resume=True, force=False)
    assert out.read_text() == "idx\tvalue\n0\t0\n1\t2\n2\t4\n"
    assert outcome == RunOutcome(out, 3, 1, None)  # 3 jobs, of which 1 was resumed


def test_a_failed_resume_of_an_existing_file_removes_nothing(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    write_rows(out, {"sigma": 0.25}, COLUMNS, [0], _rows, resume=False, force=False)
    before = {path: path.read_bytes() for path in [out, *_sidecars(out)]}
    with pytest.raises(RuntimeError):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1], _failing_after(0), resume=True, force=False)
    assert out.read_bytes() == before[out]
    assert all(path.exists() for path in _sidecars(out))


def test_a_failed_start_over_keeps_only_the_files_that_were_there(tmp_path) -> None:
    """--force over an output whose sidecars were lost: the run fails before its first row, so the output it replaced
    by a bare header is not resumable, yet it existed before the run and stays; the sidecars the run created go."""
    out = tmp_path / "c.tsv"
    out.write_text("idx\tvalue\n")
    with pytest.raises(RuntimeError):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1], _failing_after(0), resume=False, force=True)
    assert out.exists()
    assert not any(path.exists() for path in _sidecars(out))


def test_a_file_with_a_row_and_no_recorded_settings_is_not_resumed(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    out.write_text("idx\tvalue\n0\t0\n")  # one complete row, sidecar lost: its row cannot be checked
    with pytest.raises(SmoothAdvError, match="its recorded settings, is missing"):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1], _rows, resume=True, force=False)
    assert out.read_text() == "idx\tvalue\n0\t0\n"
    header_only = tmp_path / "h.tsv"
    header_only.write_text("idx\tvalue\n")  # no row to check: resumed as a fresh run
    write_rows(header_only, {"sigma": 0.25}, COLUMNS, [0, 1], _rows, resume=True, force=False)
    assert header_only.read_text() == "idx\tvalue\n0\t0\n1\t2\n"


def test_a_file_that_is_not_a_table_is_refused_as_such_on_resume(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    out.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\n\n")  # an image saved under the output's name
    with pytest.raises(SmoothAdvError, match="is not a text"):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0], _rows, resume=True, force=False)


def test_force_without_resume_starts_a_file_of_other_settings_over(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1], _rows, resume=False, force=False)
    write_rows(out, {"sigma": 0.5}, COLUMNS, [3], _rows, resume=False, force=True)
    assert out.read_text() == "idx\tvalue\n3\t6\n"
    assert json.loads(settings_path(out).read_text())["sigma"] == 0.5


def test_restart_on_change_starts_over_a_file_of_other_settings(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1], _rows, resume=False, force=False)
    write_rows(out, {"sigma": 0.5}, COLUMNS, [2], _rows, resume=True, force=False, restart_on_change=True)
    assert out.read_text() == "idx\tvalue\n2\t4\n"
    assert json.loads(settings_path(out).read_text())["sigma"] == 0.5
    write_rows(out, {"sigma": 0.5}, COLUMNS, [2, 3], _rows, resume=True, force=False, restart_on_change=True)
    assert out.read_text() == "idx\tvalue\n2\t4\n3\t6\n"  # the same settings: resumed, not restarted


def test_rows_resumed_out_of_order_are_put_back_in_job_order(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    write_rows(out, {"sigma": 0.25}, COLUMNS, [10], _rows, resume=False, force=False)
    # job 2 comes before job 10 (and "10" sorts before "2" as text: the order is the jobs', not the rows')
    write_rows(out, {"sigma": 0.25}, COLUMNS, [2, 10], _rows, resume=True, force=False)
    assert out.read_text() == "idx\tvalue\n2\t4\n10\t20\n"


def test_the_progress_counts_every_row_once(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "c.tsv"
    write_rows(out, {"sigma": 0.25}, COLUMNS, [0], _rows, resume=False, force=False, progress=False)
    monkeypatch.setattr("smoothadv.progress.LINE_INTERVAL", 0.0)  # a progress line after every row
    capsys.readouterr()
    write_rows(out, {"sigma": 0.25}, COLUMNS, [0, 1, 2], _rows, resume=True, force=False, progress=False)
    counts = [line.split(" rows")[0] for line in capsys.readouterr().err.splitlines()]
    assert counts == ["2/3", "3/3"]  # one line per row written, starting from the row already there


def test_resuming_a_record_without_a_digest_says_the_rows_are_unverified(tmp_path, capsys) -> None:
    out = tmp_path / "c.tsv"
    write_rows(out, {"sigma": 0.25}, COLUMNS, [0], _rows, resume=False, force=False)
    capsys.readouterr()
    write_rows(out, {"sigma": 0.25, "checkpoint_sha256": "ab" * 32}, COLUMNS, [0, 1], _rows, resume=True,
               force=False)
    assert "records no checkpoint_sha256" in capsys.readouterr().err  # said by default
    assert json.loads(settings_path(out).read_text())["unverified"] == ["checkpoint_sha256"]


def test_an_attack_recipe_is_checked_with_the_radii_before_any_work() -> None:
    with pytest.raises(SmoothAdvError, match="gradient"):  # DDN has no gradient-free variant
        check_radii(AttackRunSettings(sigma=0.25, eps=[0.5], attack={"attack": "ddn", "gradient_free": True}))
    with pytest.raises(SmoothAdvError, match="same radius"):
        check_radii(AttackRunSettings(sigma=0.25, eps=[0.5, 0.5000001], attack={"attack": "pgd"}))
    check_radii(AttackRunSettings(sigma=0.25, eps=[0.25, 0.5], attack={"attack": "pgd"}))


def test_denoiser_steps_without_a_denoiser_are_refused_before_the_checkpoint_is_read(tmp_path) -> None:
    run = RunSettings(checkpoint=str(tmp_path / "missing.pth"), out=tmp_path / "c.tsv", denoiser_steps=4)
    with pytest.raises(SmoothAdvError, match="--denoiser-steps 4 needs --denoiser"):
        load_smoothed(run, CertifySettings(sigma=0.25))


def test_the_split_asked_for_is_the_split_loaded_and_bn_folding_leaves_a_diffusion_unet_alone(toy_checkpoint,
                                                                                             tmp_path) -> None:
    run = RunSettings(checkpoint=str(toy_checkpoint), out=tmp_path / "c.tsv")
    _, train, _, _ = load_smoothed(run, CertifySettings(sigma=0.25, split="train"))
    _, test, _, _ = load_smoothed(run, CertifySettings(sigma=0.25))
    assert (len(train), len(test)) == (512, 128)  # the synthetic data's two splits
    pytest.importorskip("diffusers")
    from conftest import save_tiny_ddpm

    with_ddpm = RunSettings(checkpoint=str(toy_checkpoint), out=tmp_path / "c.tsv",
                            denoiser=str(save_tiny_ddpm(tmp_path / "ddpm")))
    parts = {fold: [type(m).__name__ for m in load_smoothed(with_ddpm, CertifySettings(sigma=0.25, fold_bn=fold))[0]
                    .base_classifier.children()] for fold in (False, True)}
    # torch.fx cannot trace the UNet: --fold-bn folds the classifier alone, and only when asked
    assert parts == {False: ["DiffusionDenoiser", "Sequential"], True: ["DiffusionDenoiser", "GraphModule"]}


def test_an_output_that_is_a_directory_is_refused_as_such_on_resume(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    out.mkdir()
    with pytest.raises(SmoothAdvError, match="is a directory, expected a file path"):
        write_rows(out, {"sigma": 0.25}, COLUMNS, [0], _rows, resume=True, force=False)


def test_a_sequential_output_started_before_samples_was_named_resumes_under_its_own_header(toy_checkpoint,
                                                                                          tmp_path) -> None:
    from smoothadv.run import run_evaluation
    from smoothadv.sequential import LEGACY_SEQUENTIAL_COLUMNS

    out = tmp_path / "c.tsv"
    run = RunSettings(checkpoint=str(toy_checkpoint), out=out, device="cpu", progress=False)
    settings = CertifySettings(sigma=0.25, mode="sequential", n0=10, n=2000, batch=200, max=1, seed=1)
    run_evaluation(run, settings, log=None)
    header, first = out.read_text().splitlines()
    legacy = "\t".join(LEGACY_SEQUENTIAL_COLUMNS)
    out.write_text(f"{legacy}\n{first}\n")  # the column was called n then
    run_evaluation(RunSettings(checkpoint=str(toy_checkpoint), out=out, device="cpu", progress=False, resume=True),
                   CertifySettings(sigma=0.25, mode="sequential", n0=10, n=2000, batch=200, max=2, seed=1), log=None)
    lines = out.read_text().splitlines()
    assert lines[:2] == [legacy, first] and len(lines) == 3
    assert len(lines[2].split("\t")) == len(LEGACY_SEQUENTIAL_COLUMNS)


def test_write_rows_refuses_a_file_of_other_settings_unless_told_to_start_over(tmp_path, monkeypatch,
                                                                            capsys) -> None:
    out = tmp_path / "w.tsv"
    write_rows(out, {"sigma": 0.25}, ("idx", "value"), [0, 1], _rows, resume=False, force=False)
    assert out.read_text() == "idx\tvalue\n0\t0\n1\t2\n"
    with pytest.raises(SmoothAdvError, match="sigma"):  # by default a change of settings is refused
        write_rows(out, {"sigma": 0.5}, ("idx", "value"), [0, 1, 2], _rows, resume=True, force=False)
    assert out.read_text() == "idx\tvalue\n0\t0\n1\t2\n"
    monkeypatch.setattr("smoothadv.progress.LINE_INTERVAL", 0.0)  # a progress line after every row
    capsys.readouterr()
    write_rows(out, {"sigma": 0.25}, ("idx", "value"), [0, 1, 2, 3], _rows, resume=True, force=False)
    assert out.read_text() == "idx\tvalue\n0\t0\n1\t2\n2\t4\n3\t6\n"
    assert "4/4 rows" in capsys.readouterr().err  # shown by default (every rank but torchrun's others)
