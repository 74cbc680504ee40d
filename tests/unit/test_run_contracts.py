"""Contracts of the durable evaluation run's pure helpers (`smoothadv.run`), at their edges: which examples a run
selects, which of them a shard takes, and how a written row is keyed, checked without running a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smoothadv import SmoothAdvError
from smoothadv.files import file_sha256
from smoothadv.run import (
    DIGESTED,
    _data_extension,
    _outputs,
    _short,
    job_key,
    record,
    resume_differences,
    row_key,
    select_indices,
    shard_indices,
    unfinished,
)
from smoothadv.rundir import data_fingerprint, settings_path
from smoothadv.settings import BettingSettings, CertifySettings, RunSettings, SpendingSettings


def test_the_selection_takes_every_skip_th_example_up_to_max_and_refuses_what_selects_nothing() -> None:
    assert select_indices(10) == list(range(10))
    assert select_indices(10, 3) == [0, 3, 6, 9]
    assert select_indices(10, 3, 1) == [0]  # one example is a selection
    assert select_indices(10, 3, 2, start=1) == [1, 4]
    assert select_indices(1) == [0]  # so is a dataset of one example
    assert select_indices(10**18, 10**17, 3) == [0, 10**17, 2 * 10**17]  # sliced before it is listed
    for args, message in [((10, 0), "skip must be >= 1"), ((10, 1, 0), "max must be >= 1"),
                          ((0,), "the dataset is empty")]:
        with pytest.raises(SmoothAdvError, match=message):
            select_indices(*args)


def test_shards_take_the_jobs_round_robin_and_refuse_an_impossible_shard() -> None:
    jobs = list(range(7))
    assert shard_indices(jobs, 0, 1) == jobs  # one shard is the whole run
    assert [shard_indices(jobs, i, 3) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard_indices(jobs, 1, 2) == [1, 3, 5]
    for shard, count in [(0, 0), (1, 1), (2, 2), (-1, 2), (3, 2)]:
        with pytest.raises(SmoothAdvError, match="shard must be i/k with 0 <= i < k"):
            shard_indices(jobs, shard, count)


def test_a_written_row_is_keyed_as_its_job() -> None:
    assert row_key(["idx", "label", "radius"], ["12", "3", "0.5"]) == "12" == job_key(12)
    assert row_key(["label", "idx"], ["3", "12"]) == "12"  # the idx column wherever it is
    assert row_key(["label", "radius"], ["3", "0.5"]) == "3"  # no idx column: the first field
    attack = ["idx", "label", "predict", "eps"]
    assert row_key(attack, ["12", "3", "3", "0.50"]) == "12@0.5" == job_key((0.5, 12))
    assert row_key(attack, ["12", "3", "3", "half"]) == "12@half"  # unreadable eps: kept as written


def test_an_evaluation_writes_its_output_its_shard_files_their_sidecars_and_locks() -> None:
    final = Path("o.tsv")

    def sidecars(what: str, path: Path) -> list[tuple[str, Path]]:
        return [(what, path), ("the settings sidecar", Path(f"{path}.args.json")),
                ("the environment sidecar", Path(f"{path}.env.json")), ("the lock file", Path(f"{path}.lock"))]

    assert _outputs(final, None, 1) == sidecars("--out", final)  # one process, no shard: the output alone
    shard = Path("o.tsv.shard-1-of-3")
    assert _outputs(final, (1, 3), 1) == sidecars("--out", final) + sidecars("the shard file", shard)
    first, second = Path("o.tsv.shard-0-of-2"), Path("o.tsv.shard-1-of-2")  # torchrun, rank 0 of 2: its own, then all
    assert _outputs(final, (0, 2), 2) == (sidecars("--out", final) + sidecars("the shard file", first)
                                          + sidecars("the shard file", first) + sidecars("the shard file", second))


class _Images(torch.utils.data.Dataset):
    """Ten one-pixel examples: example i is the value i with label i % 3."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 1, 1), float(i)), i % 3


def test_a_larger_max_accepts_the_new_data_digest_only_when_the_recorded_selection_is_these_data(tmp_path) -> None:
    data, out = _Images(), tmp_path / "c.tsv"
    out.write_text("idx\n")

    def recorded(maximum: object, digest: str) -> None:
        settings_path(out).write_text(json.dumps({"command": "certify", "max": maximum, "data_sha256": digest}))

    now = CertifySettings(sigma=0.25, skip=2, max=4)
    recorded(2, data_fingerprint(data, [0, 2], DIGESTED))  # the first 2 of these data: the longer selection extends
    rule = _data_extension(out, data, now)
    assert list(rule) == ["data_sha256"] and rule["data_sha256"]("2:a", "4:b") is None
    recorded(2, data_fingerprint(data, [0, 4], DIGESTED))  # another selection's digest: not these rows
    assert _data_extension(out, data, now) == {}
    recorded(4, "4:" + "0" * 64)  # the same max: nothing extends
    assert _data_extension(out, data, now) == {}
    for maximum in (0, -3, True, 2.0, "2"):  # a hand-edited max selects nothing known: no extension, no error
        recorded(maximum, data_fingerprint(data, [0, 2], DIGESTED))
        assert _data_extension(out, data, now) == {}
    recorded(None, data_fingerprint(data, [0, 2, 4, 6, 8], DIGESTED))  # all of them: the rows of these data
    assert list(_data_extension(out, data, now)) == ["data_sha256"]
    settings_path(out).unlink()
    assert _data_extension(out, data, now) == {}  # nothing recorded: nothing to extend


def test_a_digest_in_a_message_is_shortened_to_its_first_12_hex_digits_and_keeps_its_count() -> None:
    assert _short("5:" + "ab" * 32) == "5:" + "ab" * 6 + "..."
    assert _short("a" * 12) == "a" * 12 and _short("a" * 13) == "a" * 12 + "..."
    assert _short({"weights": "c" * 64, "n": None}) == "{weights: cccccccccccc..., n: none}"
    assert _short(None) == "none" and _short(3) == "3"


def test_batch_and_max_may_change_only_between_two_evaluation_records() -> None:
    certify = {"command": "certify", "batch": 100, "max": 4, "sigma": 0.25}
    assert resume_differences(certify, {**certify, "batch": 7, "max": 8}) == ([], ["batch: 100 -> 7", "max: 4 -> 8"])
    training = {"command": "train", "batch": 100, "max": 4, "sigma": 0.25}
    refused, accepted = resume_differences(training, {**training, "batch": 7, "max": 8})
    assert accepted == [] and [line.split(":")[0] for line in refused] == ["batch", "max"]
    refused, accepted = resume_differences(training, {**certify, "batch": 7})
    assert accepted == [] and [line.split(":")[0] for line in refused] == ["batch", "command"]


def test_a_sequential_certify_records_the_test_it_resolved_and_fixed_n_records_none() -> None:
    run = RunSettings(checkpoint="c.pth", out=Path("o.tsv"))
    spending = record(run, CertifySettings(sigma=0.25, mode="sequential"))
    # the schedule of docs/sequential.md at sigma 0.25, alpha 0.001: a quarter of alpha at 6,144, half at the last
    assert spending["looks"] == [1024, 2048, 4096, 6144, 8192, 16384, 32768, 65536, 111616]
    assert spending["levels"][3] == pytest.approx(0.00025) and spending["levels"][-1] == pytest.approx(0.0005)
    assert sum(spending["levels"]) == pytest.approx(0.001)
    assert {key: spending[key] for key in ("mode", "n", "class_from", "policy", "radii", "tolerance", "test",
                                          "forecast_alpha", "selection")} == {
        "mode": "sequential", "n": None, "class_from": "selection", "policy": "grid", "radii": [0.0, 0.25, 0.5, 0.75],
        "tolerance": 0.0, "test": "spending", "forecast_alpha": 0.05, "selection": "adaptive"}
    assert "sequential" not in spending  # recorded flat, as every version wrote it
    strict = record(run, CertifySettings(sigma=0.25, mode="sequential", class_from="label",
                                         sequential=SpendingSettings(forecast_alpha=None, radii=(0.5,))))
    assert (strict["forecast_alpha"], strict["class_from"], strict["radii"]) == ("strict", "label", [0.5])
    betting = record(run, CertifySettings(sigma=0.25, mode="sequential", sequential=BettingSettings()))
    assert (betting["test"], betting["looks"], betting["levels"], betting["final_share"]) == (
        "betting", [64, 111616], None, 0.5)
    assert betting["bets"][0] == [1.0, 0.5] and sum(w for _, w in betting["bets"]) == pytest.approx(1.0)
    fixed = record(run, CertifySettings(sigma=0.25, n=500), checkpoint_sha256="ab")
    assert {key: fixed[key] for key in ("mode", "n", "class_from", "policy", "radii", "tolerance", "test", "looks",
                                       "forecast_alpha", "selection", "checkpoint_sha256")} == {
        "mode": "fixed", "n": 500, "class_from": None, "policy": None, "radii": None, "tolerance": None, "test": None,
        "looks": None, "forecast_alpha": None, "selection": None, "checkpoint_sha256": "ab"}
    assert "sequential" not in fixed


def test_an_evaluation_is_finished_when_its_output_holds_every_row_with_these_settings(tmp_path) -> None:
    model = tmp_path / "m.pth"
    model.write_bytes(b"weights")
    run = RunSettings(checkpoint=str(model), out=tmp_path / "c.tsv")
    settings = CertifySettings(sigma=0.25, n=100, skip=5, max=2)
    assert unfinished(run, settings) == "did not finish"  # no output
    run.out.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.2\t1\t0:00:01\n")
    assert unfinished(run, settings) is None  # no sidecar (another tool's file): only its existence is judged
    written = record(run, settings, dataset_size=10, checkpoint_sha256=file_sha256(model))
    settings_path(run.out).write_text(json.dumps(written, default=str))  # paths as text, as runs write them
    assert unfinished(run, settings) == "did not finish"  # 1 of the 2 rows its selection holds
    with run.out.open("a") as handle:
        handle.write("5\t2\t2\t0.3\t1\t0:00:01\n")
    assert unfinished(run, settings) is None
    assert unfinished(run, CertifySettings(sigma=0.25, n=100, skip=5, max=2, batch=7)) is None  # batch: no row
    assert unfinished(run, CertifySettings(sigma=0.5, n=100, skip=5, max=2)) == \
        "was made with other settings (sigma: 0.25 != 0.5)"
    assert unfinished(run, CertifySettings(sigma=0.25, n=100, skip=4, max=2), free=("skip",)) is None
    model.write_bytes(b"other weights")  # another model at the checkpoint's path
    assert unfinished(run, settings).startswith("was made with other settings (checkpoint_sha256: ")
    model.unlink()  # no model there: its digest cannot be compared
    assert unfinished(run, settings) is None
