"""Provenance enforced, unit by unit: the digests `run` compares (by name, with what each identifies), the rule for
a digest a record lacks (unverified, not refused), the environments a resumed run keeps (`files`, `rundir`), and
the recorded selection of a smoothed prediction (`evaluate.read_smooth_prediction`). Each test's docstring says
which wrong result its check prevents; the command-line cases are in tests/e2e/test_provenance_enforced.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoothadv.errors import SmoothAdvError
from smoothadv.evaluate import read_smooth_prediction
from smoothadv.files import write_provenance
from smoothadv.run import DIGESTS, merge_shards, resume_differences, setting_differences, unverified
from smoothadv.rundir import RunDirectory

A, B = "a" * 64, "b" * 64
RECORD = {"command": "certify", "mode": "fixed", "sigma": 0.25, "n": 100, "n0": 10, "alpha": 0.001, "seed": 0,
          "skip": 1, "max": None, "split": "test", "batch": 100, "dataset_size": 4, "checkpoint_sha256": A,
          "data_sha256": "4:" + A, "denoiser": None, "shard": None}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Provenance's git calls are slow and tested elsewhere."""
    monkeypatch.setattr("smoothadv.files.git_revision", lambda: None)


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_every_digest_differing_is_refused_by_resume_merge_and_report(name) -> None:
    """Prevents rows of two models (or two datasets) meeting in one output or one table row: each recorded digest
    is compared when both records hold it, and the refusal names it and what it identifies."""
    denoiser = {"denoiser": "d.pth.tar"} if name.startswith("denoiser_") else {}
    then, now = {**RECORD, **denoiser, name: A}, {**RECORD, **denoiser, name: B}
    refused, _ = resume_differences(then, now)
    assert [r.split(":", 1)[0] for r in refused] == [name] and DIGESTS[name] in refused[0], refused
    assert f"{A[:12]}... != {B[:12]}..." in refused[0]
    assert [r.split(":", 1)[0] for r in setting_differences(then, now)] == [name]


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_a_digest_one_record_lacks_is_unverified_not_refused(name) -> None:
    """Prevents refusing every output written before a digest was recorded (or by another tool), while saying
    which digests could not be checked (`unverified`), so nothing claims a verification that did not happen."""
    denoiser = {"denoiser": "d.pth.tar"} if name.startswith("denoiser_") else {}
    then = {k: v for k, v in {**RECORD, **denoiser}.items() if k != name}
    now = {**RECORD, **denoiser, name: B}
    assert resume_differences(then, now)[0] == [] and setting_differences(then, now) == []
    assert unverified(then, now) == unverified(now, then) == [name]
    assert unverified(now, now) == []


def test_no_denoiser_is_a_difference_not_a_missing_digest() -> None:
    """Prevents rows of f and of f o D meeting: a record of a run without a denoiser holds no denoiser digest,
    and that absence is compared (none != the digest), not taken for a digest too old to be recorded."""
    with_one = {**RECORD, "denoiser": "d.pth.tar", "denoiser_sha256": B}
    for then, now in ((RECORD, with_one), (with_one, RECORD)):
        refused, _ = resume_differences(then, now)
        assert any(r.startswith("denoiser_sha256: ") for r in refused), refused
        assert unverified(then, now) == []


def test_a_merged_output_lists_the_digests_its_shards_lack_or_list(tmp_path) -> None:
    """Prevents a merged sidecar claiming a digest for rows never checked against it: a digest some shard lacks
    is dropped from the merged record and listed under `unverified`, with those the shards already listed."""
    out = tmp_path / "out.tsv"
    shards = [{**RECORD, "shard": [0, 2], "unverified": ["data_sha256"]},
              {k: v for k, v in RECORD.items() if k != "checkpoint_sha256"} | {"shard": [1, 2]}]
    for i, (recorded, rows) in enumerate(zip(shards, (["0", "2"], ["1", "3"]))):
        path = Path(f"{out}.shard-{i}-of-2")
        path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                        + "".join(f"{r}\t1\t1\t0.3\t1\t0:00:01\n" for r in rows))
        Path(f"{path}.args.json").write_text(json.dumps(recorded))
    assert merge_shards(out) == 4
    merged = json.loads(Path(f"{out}.args.json").read_text())
    assert "checkpoint_sha256" not in merged
    assert merged["unverified"] == ["checkpoint_sha256", "data_sha256"]


# ------------------------------------------------------------------ environments


def _environments(monkeypatch, *torches: str) -> None:
    versions = iter(torches)
    monkeypatch.setattr("smoothadv.files.environment", lambda: {"torch": next(versions), "python": "3"})


def test_a_resumed_output_keeps_its_earlier_environments_and_a_fresh_one_does_not(tmp_path, monkeypatch) -> None:
    """Prevents attributing rows to an environment they were not all computed in: a resumed output's env.json
    keeps each earlier, different environment under `earlier`; a fresh run (--force) starts a new list."""
    _environments(monkeypatch, "1", "2", "2", "3")
    write_provenance(tmp_path, {"a": 1}, prefix="o.")
    for _ in range(2):  # the second resume changes nothing: no new entry
        write_provenance(tmp_path, {"a": 1}, prefix="o.", resumed=True)
    env = json.loads((tmp_path / "o.env.json").read_text())
    assert env == {"torch": "2", "python": "3", "earlier": [{"torch": "1", "python": "3"}]}
    write_provenance(tmp_path, {"a": 1}, prefix="o.")
    assert json.loads((tmp_path / "o.env.json").read_text()) == {"torch": "3", "python": "3"}


def test_a_resumed_training_run_keeps_its_earlier_environment(tmp_path, monkeypatch) -> None:
    """Prevents a training run's env.json describing only its last resumption: a record with a resume `history`
    (`RunDirectory.history`) keeps the earlier environment; a record without one (a fresh start) does not."""
    _environments(monkeypatch, "1", "2", "3")
    directory = RunDirectory(tmp_path, "checkpoint.pth.tar")
    directory.write_provenance({"epochs": 1, "history": []})
    directory.write_provenance({"epochs": 2, "history": [{"resumed_at_epoch": 1, "changed": {}}]})
    assert json.loads((tmp_path / "env.json").read_text())["earlier"] == [{"torch": "1", "python": "3"}]
    directory.write_provenance({"epochs": 2, "history": []})
    assert "earlier" not in json.loads((tmp_path / "env.json").read_text())


# ------------------------------------------------------------------ the smoothed prediction CAT-RS reads


def _smooth_prediction(path: Path, rows: int, **recorded: object) -> Path:
    path.write_text("idx\tlabel\tpredict\tcorrect\tcounts\ttime\n"
                    + "".join(f"{i}\t0\t0\t1\t3,1\t0:00:01\n" for i in range(rows)))
    Path(f"{path}.args.json").write_text(json.dumps({"command": "smooth-prediction", "split": "train",
                                                     "dataset_size": 8, "skip": 1, "max": 4, "shard": None,
                                                     **recorded}))
    return path


def test_a_shard_of_a_smoothed_prediction_is_refused(tmp_path) -> None:
    """Prevents CAT-RS training on uniform targets for every example of the other shards: a shard's sidecar
    records its shard, so it is refused until the shards are merged."""
    path = _smooth_prediction(tmp_path / "pi.tsv.shard-0-of-2", 2, shard=[0, 2])
    with pytest.raises(SmoothAdvError, match="is shard 0 of 2 .* merge the shards"):
        read_smooth_prediction(path)


def test_an_unfinished_smoothed_prediction_is_refused(tmp_path) -> None:
    """Prevents CAT-RS training on uniform targets for the examples a killed smooth-prediction run did not reach:
    the sidecar records the selection (4 of 8 examples), so a file with fewer rows is refused; the finished file
    loads (the examples outside the selection are uniform, as in the original)."""
    with pytest.raises(SmoothAdvError, match="unfinished: 3 of the 4 examples .* --resume"):
        read_smooth_prediction(_smooth_prediction(tmp_path / "killed.tsv", 3))
    pi = read_smooth_prediction(_smooth_prediction(tmp_path / "done.tsv", 4))
    assert pi.shape == (8, 2) and pi[0].tolist() == [0.75, 0.25] and pi[7].tolist() == [0.5, 0.5]
