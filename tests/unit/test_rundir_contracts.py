"""Contracts of a training run's directory (`smoothadv.rundir`) at their edges: which epoch's objective a resumed
run is compared with, what a refusal says may change, what a failed run removes, and a fresh log never read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import toy_train_settings as settings

from smoothadv.attacks import build_attack
from smoothadv.errors import SmoothAdvError
from smoothadv.objectives import GaussianAugmentation, build_objective
from smoothadv.rundir import EpochLog, RunDirectory, epochs_may_grow, unrecorded_digests
from smoothadv.settings import TrainSettings, bookkeeping_fields, flag_name


def test_epochs_may_grow_to_at_least_the_epochs_trained_and_digests_older_than_a_record_are_listed() -> None:
    rule = epochs_may_grow(3)
    assert rule(5, 3) is None and rule(5, 4) is None  # stopping at the epochs already trained is no change of run
    assert rule(5, 2) == "already trained 3" and rule(5, 3.5) == "already trained 3"
    now = {"lr": 0.1, "new_field": 1, "pi_sha256": "ab", "data_sha256": "cd"}
    assert unrecorded_digests({"lr": 0.1, "data_sha256": "cd"}, now) == ("pi_sha256",)  # digests only, new only
    assert unrecorded_digests(now, now) == ()


def _smoothadv(warmup: int = 4, eps: float = 1.0):
    return build_objective("smoothadv", 0.25, {"warmup": warmup}, attack=build_attack("pgd", eps, 2))


@pytest.mark.parametrize("done", [1, 2, 3])
def test_the_objective_is_compared_as_it_was_at_the_last_trained_epoch(tmp_path: Path, done: int) -> None:
    """The checkpoint of epoch `done` records the objective of its last epoch (eps warmed up to (done/4) eps), so a
    resumed run is the same run only if it compares the objective at that epoch, not the next nor the first."""
    directory = RunDirectory(tmp_path, "checkpoint.pth.tar")
    config = json.loads(json.dumps(dataclasses.asdict(settings(epochs=5)), default=str))
    objective = _smoothadv()
    saved = {"config": config, "epoch": done, "objective": objective.at_epoch(done - 1).describe()}
    directory.check_resumable(saved, settings(epochs=5), objective)
    directory.check_resumable(saved, settings(epochs=5))  # no objective given: the settings alone
    with pytest.raises(SmoothAdvError, match=rf"objective attack .*'eps': {done / 4}, .* -> .*'eps': {done / 2}, "):
        directory.check_resumable(saved, settings(epochs=5), _smoothadv(eps=2.0))  # compared at that epoch too
    with pytest.raises(SmoothAdvError, match="--objective SmoothAdv -> GaussianAugmentation"):
        directory.check_resumable(saved, settings(epochs=5), GaussianAugmentation(0.25))


def test_a_refused_resume_names_the_flags_that_may_change(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path, "checkpoint.pth.tar")
    saved = {"config": json.loads(json.dumps(dataclasses.asdict(settings(epochs=3)), default=str)), "epoch": 1}
    with pytest.raises(SmoothAdvError) as info:
        directory.check_resumable(saved, settings(epochs=3, lr=0.5))
    free = [flag_name(f) for f in dataclasses.fields(TrainSettings)
            if f.name in bookkeeping_fields(TrainSettings) and f.name not in ("out_dir", "resume", "force")]
    assert len(free) >= 2 and "--device" in free and "--out" not in free and "--resume" not in free
    assert str(info.value).endswith(
        f"on resume only --epochs (to extend it), {', '.join(free[:-1])} and {free[-1]} may change: use the recorded "
        "settings, or start over with --force or a new --out")


def test_a_fresh_log_never_reads_the_old_one_and_force_replaces_a_log_of_another_run(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    log.write_text("step\tother\n1\t2\n")
    assert EpochLog(log, ("epoch", "loss"), 0).lines == ["epoch\tloss"]  # a fresh run starts its own log
    directory = RunDirectory(tmp_path, "checkpoint.pth.tar")
    with pytest.raises(SmoothAdvError, match="not the log of this kind of run"):
        directory.refuse_another_run(("epoch", "loss"), force=False)
    directory.refuse_another_run(("epoch", "loss"), force=True)  # --force: replaced, not refused


def test_a_run_failing_before_its_first_checkpoint_removes_only_the_files_it_created(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path / "run", "checkpoint.pth.tar")
    directory.path.mkdir()
    (directory.path / "log.tsv").write_text("epoch\tloss\n")  # there before the run
    before = directory.existing()
    (directory.path / "args.json").write_text("{}")
    (directory.path / "env.json").write_text("{}")
    directory.forget_new(before)
    assert sorted(p.name for p in directory.path.iterdir()) == ["log.tsv"]
    directory.remove_if_empty()
    assert directory.path.exists()  # not empty: kept
    (directory.path / "args.json").write_text("{}")
    directory.checkpoint.write_bytes(b"x")  # a checkpoint was written: the run has something to resume
    directory.forget_new(before)
    assert (directory.path / "args.json").exists()
    for path in directory.path.iterdir():
        path.unlink()
    directory.remove_if_empty()
    assert not directory.path.exists()
