"""`rundir`: the one rule of resumption, the checkpoint-then-log order, the history, the lock."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import toy_train_settings as settings

from smoothadv.errors import SmoothAdvError
from smoothadv.rundir import EpochLog, RunDirectory, compare, epochs_may_grow, objective_record, plain
from smoothadv.settings import TrainSettings, bookkeeping_fields


def test_free_fields_may_differ_others_must_agree_and_listed_changes_follow_their_rule() -> None:
    recorded = {"lr": 0.1, "epochs": 3, "device": "cpu", "batch_size": 64}
    now = {"lr": 0.1, "epochs": 5, "device": "cuda", "batch_size": 32}
    refused, accepted = compare(recorded, now, free={"device"}, accepted={"epochs": epochs_may_grow(3)})
    assert [d.refused() for d in refused] == ["batch_size: 64 != 32"]
    assert [d.accepted() for d in accepted] == ["epochs: 3 -> 5"]
    refused, _ = compare(recorded, {**recorded, "epochs": 2}, accepted={"epochs": epochs_may_grow(3)})
    assert refused[0].name == "epochs" and "already trained 3" in refused[0].refused()


def test_a_record_older_than_a_field_counts_as_its_default_and_keys_limit_what_is_compared() -> None:
    refused, _ = compare({"lr": 0.1, "extra": {}}, {"lr": 0.1, "optimizer": "sgd"}, defaults={"optimizer": "sgd"},
                         keys=("lr", "optimizer"))
    assert refused == []
    refused, _ = compare({"lr": 0.1}, {"lr": 0.1, "optimizer": "adam"}, defaults={"optimizer": "sgd"})
    assert [d.refused() for d in refused] == ["optimizer: 'sgd' != 'adam'"]
    refused, _ = compare({"denoiser_sha256": "ab"}, {})  # without keys: every key of either side
    assert [d.name for d in refused] == ["denoiser_sha256"]


@dataclasses.dataclass(frozen=True)
class Inner:
    eps: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    sigma: float
    attack: Inner

    def describe(self) -> dict:
        return {"name": "Outer", "sigma": self.sigma, "attack": plain(self.attack)}


def test_nested_settings_are_plain_data_and_an_older_repr_is_compared_by_repr() -> None:
    objective = Outer(0.25, Inner())
    assert plain(objective) == {"name": "Outer", "sigma": 0.25, "attack": {"eps": 0.5}}
    older = {"name": "Outer", "sigma": 0.25, "attack": repr(Inner())}
    assert compare(older, objective_record(objective, older)) == ([], [])
    changed = objective_record(Outer(0.25, Inner(1.0)), older)
    assert [d.name for d in compare(older, changed)[0]] == ["attack"]
    assert compare(older, {**older, "attack": plain(Inner())})[0]  # a dict is not the repr it replaced


def test_check_resumable_refuses_in_one_line_naming_the_flag(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path, "checkpoint.pth.tar")
    saved = {"config": json.loads(json.dumps(dataclasses.asdict(settings(epochs=3)), default=str)), "epoch": 2}
    directory.check_resumable(saved, settings(epochs=4, device="cuda"))
    with pytest.raises(SmoothAdvError, match=r"--lr 0.1 -> 0.5") as info:
        directory.check_resumable(saved, settings(epochs=3, lr=0.5))
    assert "\n" not in str(info.value)
    with pytest.raises(SmoothAdvError, match="already trained 2 epochs"):
        directory.check_resumable(saved, settings(epochs=1))
    with pytest.raises(SmoothAdvError, match="records no training settings"):
        directory.check_resumable({"epoch": 1}, settings())


def test_unfinished_judges_a_run_by_its_args_json_and_log_alone(tmp_path: Path) -> None:
    from smoothadv.objectives import GaussianAugmentation

    directory, objective = RunDirectory(tmp_path, "checkpoint.pth.tar"), GaussianAugmentation(0.25)
    assert directory.unfinished(settings(epochs=2), objective) == "was not trained"
    record = {**json.loads(json.dumps(dataclasses.asdict(settings(epochs=2)), default=str)),
              "objective": {"name": "GaussianAugmentation", "sigma": 0.25}}
    record.pop("precision")  # a record older than a field counts as its default
    directory.write_provenance(record)
    assert directory.unfinished(settings(epochs=2), objective) == "was not trained"  # no log.tsv: never trained
    (tmp_path / "log.tsv").write_text("epoch\ttime\n1\t3.0\n")
    assert directory.unfinished(settings(epochs=2), objective) == "was not trained to the end"
    (tmp_path / "log.tsv").write_text("epoch\ttime\n1\t3.0\n2\t3.0\n")
    assert directory.unfinished(settings(epochs=2, device="cuda"), objective) is None  # rows=False: free
    assert directory.unfinished(settings(epochs=3), objective) == (
        "was trained with other settings (epochs: 2 != 3)")  # no change accepted, a larger --epochs neither
    assert "sigma: 0.25 != 0.5" in directory.unfinished(settings(epochs=2), GaussianAugmentation(0.5))


def test_start_refuses_an_existing_checkpoint_without_resume_or_force(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path / "run", "checkpoint.pth.tar")
    assert directory.checkpoint_to_resume(resume=True, force=False) is None  # nothing to resume yet
    with directory.lock():
        with pytest.raises(SmoothAdvError, match="another run is writing"), directory.lock():
            pass
    directory.checkpoint.write_bytes(b"x")
    with pytest.raises(SmoothAdvError, match="exists; pass --resume"):
        directory.checkpoint_to_resume(resume=False, force=False)
    assert directory.checkpoint_to_resume(resume=False, force=True) is None
    assert directory.checkpoint_to_resume(resume=False, force=False, restarted=True) == directory.checkpoint


def test_history_and_the_log_row_after_its_checkpoint(tmp_path: Path) -> None:
    directory = RunDirectory(tmp_path, "checkpoint.pth.tar")
    before, now = {"epochs": 1, "device": "cpu", "lr": 0.1}, {"epochs": 3, "device": "cuda", "lr": 0.1}
    assert directory.history(None, now, 0, {"device"}) == []
    directory.write_provenance({"history": [{"resumed_at_epoch": 1, "changed": {}}]})
    assert directory.history(before, now, 1, bookkeeping_fields(TrainSettings))[-1] == {
        "resumed_at_epoch": 1, "changed": {"device": ["cpu", "cuda"], "epochs": [1, 3]}}
    log = directory.log(("epoch", "loss"), 0)
    order: list[str] = []

    def save() -> None:
        order.append("checkpoint")
        assert not (tmp_path / "log.tsv").exists()  # the row is written after its checkpoint

    log.commit(save, ["1", "0.5"])
    assert order == ["checkpoint"] and (tmp_path / "log.tsv").read_text() == "epoch\tloss\n1\t0.5\n"
    log.commit(lambda: None, ["2", "0.4"])
    assert EpochLog(tmp_path / "log.tsv", ("epoch", "loss"), 1).lines == ["epoch\tloss", "1\t0.5"]
