"""Contracts of the durable evaluation run's pure helpers (`smoothadv.run`), at their edges: which examples a run
selects, which of them a shard takes, and how a written row is keyed, checked without running a model."""

from __future__ import annotations

import pytest

from smoothadv import SmoothAdvError
from smoothadv.run import job_key, row_key, select_indices, shard_indices


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
