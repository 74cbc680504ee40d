"""Shards and their merge (`smoothadv.run`) at the edges, on hand-written shard files: which jobs recorded settings
describe, when shards are complete, which header a merge expects, what it refuses and what it writes; and the
lines an evaluation run says, under torchrun and with --shard, on the toy checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoothadv import SmoothAdvError
from smoothadv.evaluate import ATTACK_COLUMNS, CERTIFY_COLUMNS, PREDICT_COLUMNS
from smoothadv.run import (
    LISTED_BEYOND_ROWS,
    _expected_header,
    expected_jobs,
    job_count,
    merge_shards,
    normalize_record,
    resume_differences,
    run_evaluation,
    shard_path,
    shards_complete,
)
from smoothadv.rundir import settings_path
from smoothadv.sequential import LEGACY_SEQUENTIAL_COLUMNS, SEQUENTIAL_COLUMNS
from smoothadv.settings import CertifySettings, RunSettings

HEADER = "\t".join(CERTIFY_COLUMNS)


def certify_settings(size: int, **extra) -> dict:
    return {"command": "certify", "mode": "fixed", "dataset_size": size, "skip": 1, "max": None, "sigma": 0.25,
            "batch": 10, **extra}


def row(index: int) -> str:
    return f"{index}\t1\t1\t0.5\t1\t0:00:00"


def write_shard(out: Path, i: int, k: int, indices, settings: dict, header: str = HEADER) -> Path:
    path = shard_path(out, i, k)
    path.write_text("\n".join([header, *(row(j) for j in indices)]) + "\n")
    settings_path(path).write_text(json.dumps({**settings, "shard": [i, k]}))
    return path


def test_recorded_settings_describe_their_jobs_without_listing_them() -> None:
    assert job_count({"dataset_size": 10, "skip": 3}) == 4 == len(expected_jobs({"dataset_size": 10, "skip": 3}))
    assert job_count({"dataset_size": 10, "skip": None}) == 10  # no skip recorded: every example
    assert expected_jobs({"dataset_size": 10, "skip": None}) == list(range(10))
    assert expected_jobs({"dataset_size": 10, "skip": 3}) == [0, 3, 6, 9]
    assert job_count({"dataset_size": 10, "skip": -2}) == 0  # a hand-edited skip selects nothing, never everything
    assert job_count({"dataset_size": 10, "skip": 3, "max": 2}) == 2
    assert job_count({"dataset_size": 10, "skip": 3, "eps": [0.25, 0.5]}) == 8
    assert expected_jobs({"dataset_size": 4, "skip": 3, "eps": [0.25, 0.5]}) == [
        (0.25, 0), (0.25, 3), (0.5, 0), (0.5, 3)]  # radius first
    with pytest.raises(SmoothAdvError, match="lacks dataset_size"):
        job_count({"skip": 1})


def test_the_expected_header_follows_the_command_and_else_the_majority_of_the_shards() -> None:
    assert _expected_header({"command": "certify", "mode": "fixed"}, []) == HEADER
    assert _expected_header({"command": "certify", "mode": "sequential"}, []) == "\t".join(SEQUENTIAL_COLUMNS)
    legacy = "\t".join(LEGACY_SEQUENTIAL_COLUMNS)
    assert _expected_header({"command": "certify", "mode": "sequential"}, [legacy, legacy]) == legacy
    assert _expected_header({"command": "certify", "mode": "sequential"}, [legacy, HEADER]) == \
        "\t".join(SEQUENTIAL_COLUMNS)  # legacy only when every shard is
    assert _expected_header({"command": "predict"}, [HEADER]) == "\t".join(PREDICT_COLUMNS)
    assert _expected_header({"command": "attack"}, []) == "\t".join(ATTACK_COLUMNS)
    assert _expected_header({"command": "other"}, ["b", "a", "b"]) == "b"  # the lone odd shard is the one blamed


def test_a_merge_writes_rows_in_job_order_and_a_sidecar_in_the_common_format(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    settings = certify_settings(12)
    write_shard(out, 0, 2, range(0, 12, 2), settings)
    write_shard(out, 1, 2, range(1, 12, 2), settings)
    assert merge_shards(out) == 12
    assert out.read_text() == "\n".join([HEADER, *(row(j) for j in range(12))]) + "\n"  # 2 before 10: job order
    expected = {**settings, "shard": None, "merged_from": [str(shard_path(out, i, 2)) for i in range(2)]}
    assert settings_path(out).read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    with pytest.raises(SmoothAdvError, match="already exists; pass --force"):
        merge_shards(out)  # never over an output without being told
    assert merge_shards(out, force=True) == 12


def test_a_merge_records_the_changes_each_shard_resumed_with(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    settings = certify_settings(4)
    write_shard(out, 0, 2, [0, 2], {**settings, "resumed_changes": ["batch 10 -> 20"]})
    write_shard(out, 1, 2, [1, 3], {**settings, "resumed_changes": ["batch 10 -> 30", "batch 30 -> 40"]})
    merge_shards(out)
    record = json.loads(settings_path(out).read_text())
    assert record["resumed_changes"] == ["shard 0: batch 10 -> 20", "shard 1: batch 10 -> 30",
                                         "shard 1: batch 30 -> 40"]
    write_shard(out, 1, 2, [1, 3], settings)  # only shard 0 resumed with a change
    merge_shards(out, force=True)
    assert json.loads(settings_path(out).read_text())["resumed_changes"] == ["shard 0: batch 10 -> 20"]
    write_shard(out, 0, 2, [0, 2], settings)  # none did: no history at all
    merge_shards(out, force=True)
    assert "resumed_changes" not in json.loads(settings_path(out).read_text())


def test_a_merge_refuses_a_non_integer_index(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    settings = certify_settings(2)
    write_shard(out, 0, 1, [0, 1], settings).write_text(f"{HEADER}\n{row(0)}\nx\t1\t1\t0.5\t1\t0:00:00\n")
    with pytest.raises(SmoothAdvError, match="non-integer index 'x'"):
        merge_shards(out)


def test_far_too_few_rows_are_blamed_on_the_short_shard_before_the_jobs_are_listed(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    total = 2 * LISTED_BEYOND_ROWS + 10
    settings = certify_settings(total)
    write_shard(out, 0, 2, range(0, 10, 2), settings)
    write_shard(out, 1, 2, [], settings)
    with pytest.raises(SmoothAdvError, match=rf"shard-0-of-2 is incomplete: {total // 2 - 5} of {total // 2} rows "
                                              "missing; finish it"):
        merge_shards(out)


def test_a_shard_holding_another_shard_s_rows_is_refused_naming_its_first_stray_row(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    settings = certify_settings(12)
    write_shard(out, 0, 2, [0, 2, 4, 6, 8, 10], settings)
    write_shard(out, 1, 2, [1, 3, 4, 5, 10, 11, 9, 7], settings)  # 4 and 10 are shard 0's; "10" < "4" as text
    with pytest.raises(SmoothAdvError, match=r"shard-1-of-2 has rows this shard should not have \(e\.g\. idx 4, "
                                              r"its first\)"):
        merge_shards(out)
    assert not out.exists()


def test_at_the_listing_bound_the_jobs_are_listed_and_a_missing_row_is_named(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    settings = certify_settings(LISTED_BEYOND_ROWS + 2)  # rows + the bound: still listed, the first missing named
    write_shard(out, 0, 1, [0, 1], settings)
    with pytest.raises(SmoothAdvError, match=r"1000000 of 1000002 rows missing \(e\.g\. idx 2\)"):
        merge_shards(out)


def test_shards_are_complete_only_when_each_exists_reads_and_holds_its_jobs(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    settings = certify_settings(4)
    write_shard(out, 0, 2, [0, 2], settings)
    assert not shards_complete(out, 2, settings)  # shard 1 missing (too few lines)
    write_shard(out, 0, 2, [0, 2, 0, 2, 0, 2], settings)  # enough lines for all four jobs, and shard 1 missing
    assert not shards_complete(out, 2, settings)
    write_shard(out, 1, 2, [1], settings).write_text(f"{HEADER}\n{row(1)}\n3\t1\n")  # a malformed row
    assert not shards_complete(out, 2, settings)
    write_shard(out, 1, 2, [1, 1], settings)  # enough lines, but job 3 is not among them
    assert not shards_complete(out, 2, settings)
    write_shard(out, 1, 2, [1, 3], settings)
    assert shards_complete(out, 2, settings)


def test_an_old_sequential_record_resumes_as_the_defaults_it_ran_with() -> None:
    old = {"command": "certify", "mode": "sequential", "alpha": 0.001}  # before test, selection and tolerance
    assert normalize_record(old) == {**old, "test": "spending", "selection": "fixed", "tolerance": 0.0}
    assert resume_differences(old, {**old, "test": "spending", "selection": "fixed", "tolerance": 0.0}) == ([], [])
    assert resume_differences(old, {**old, "tolerance": 0.01})[0]  # another tolerance is another test


FLAGS = {"sigma": 0.25, "n": 40, "n0": 10, "batch": 40, "max": 4, "seed": 1}


def _run(toy_checkpoint: Path, out: Path, **extra) -> RunSettings:
    return RunSettings(checkpoint=str(toy_checkpoint), out=out, device="cpu", progress=False, **extra)


def test_an_evaluation_says_what_it_wrote_and_a_missing_log_says_nothing(toy_checkpoint, tmp_path, capsys) -> None:
    lines: list[str] = []
    out = tmp_path / "c.tsv"
    run_evaluation(_run(toy_checkpoint, out), CertifySettings(**FLAGS), log=lines.append)
    assert lines == [f"wrote {out} (4 rows)"]
    run_evaluation(_run(toy_checkpoint, tmp_path / "s.tsv", shard=(1, 2)), CertifySettings(**FLAGS),
                   log=lines.append)
    assert lines[1] == (f"wrote {shard_path(tmp_path / 's.tsv', 1, 2)} (2 rows, shard 1/2); when all shards are done: "
                        f"smoothadv merge {tmp_path / 's.tsv'}")
    capsys.readouterr()
    run_evaluation(_run(toy_checkpoint, tmp_path / "quiet.tsv"), CertifySettings(**FLAGS), log=None)
    assert capsys.readouterr().out == ""


def test_under_torchrun_the_merged_output_is_checked_first_and_the_last_rank_merges(toy_checkpoint, tmp_path,
                                                                                      monkeypatch) -> None:
    out = tmp_path / "c.tsv"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SmoothAdvError, match="--shard is for separate jobs"):
        run_evaluation(_run(toy_checkpoint, out, shard=(0, 2)), CertifySettings(**FLAGS))
    out.write_text("an earlier table\n")
    with pytest.raises(SmoothAdvError, match="already exists"):  # before any work: no shard written
        run_evaluation(_run(toy_checkpoint, out), CertifySettings(**FLAGS))
    assert not shard_path(out, 1, 2).exists()
    out.unlink()
    lines: list[str] = []
    first = run_evaluation(_run(toy_checkpoint, out), CertifySettings(**FLAGS), log=lines.append)
    assert first.merged is None and lines == [] and not out.exists()  # rank 1 first: shard 0 is not done
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out.write_text("")  # an output left by an earlier merge attempt: the last rank replaces it (resume or not)
    last = run_evaluation(_run(toy_checkpoint, out, resume=True), CertifySettings(**FLAGS), log=lines.append)
    assert last.merged == out and lines == [f"wrote {out} (4 rows, merged from 2 shards)"]
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == ["idx", "0", "1", "2", "3"]


def test_a_merge_of_another_command_s_shards_keys_rows_by_their_first_column(tmp_path) -> None:
    out = tmp_path / "o.tsv"
    settings = {**certify_settings(2), "command": "other"}
    for i in range(2):
        write_shard(out, i, 2, [], settings, header="key\tnote").write_text(f"key\tnote\n{i}\tx{i}\n")
    assert merge_shards(out) == 2
    assert out.read_text() == "key\tnote\n0\tx0\n1\tx1\n"


def test_a_complete_shard_is_never_blamed_for_the_rows_another_lacks(tmp_path) -> None:
    out = tmp_path / "c.tsv"
    shards = 1001
    total = shards * shards  # each shard's share: 1001 jobs; all but one share missing, beyond the listing bound
    assert total > shards + LISTED_BEYOND_ROWS
    settings = certify_settings(total)
    write_shard(out, 0, shards, range(0, total, shards), settings)  # shard 0: every one of its jobs
    for i in range(1, shards):
        write_shard(out, i, shards, [], settings)
    with pytest.raises(SmoothAdvError, match=f"shard-1-of-{shards} is incomplete: {shards} of {shards} rows missing"):
        merge_shards(out)
