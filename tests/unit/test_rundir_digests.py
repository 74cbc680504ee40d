"""The data digests a run records (`rundir.data_digest`, `rundir.data_fingerprint`) identify the examples by content,
and a digest recorded by an earlier version must still match the same data: resume, merge and report compare them
across versions. Checked against an independent computation of the format and against values this version wrote."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from smoothadv.run import DIGESTED
from smoothadv.rundir import data_digest, data_fingerprint


def dataset(size: int) -> list[tuple[torch.Tensor, int]]:
    """Examples that differ in their bytes and labels, built without a random stream."""
    return [(torch.arange(4, dtype=torch.float32).reshape(1, 2, 2) + i, i % 10) for i in range(size)]


def reference_digest(examples: list[tuple[torch.Tensor, int]], indices: list[int]) -> str:
    """The format, written out: for each index, 'index NUL label NUL dtype NUL shape NUL' and the image's bytes."""
    digest = hashlib.sha256()
    for index in indices:
        x, y = examples[index]
        array = x.numpy()
        digest.update(f"{index}\0{y}\0{array.dtype}\0{tuple(array.shape)}\0".encode() + array.tobytes())
    return digest.hexdigest()


def test_the_digest_covers_each_example_s_index_label_type_shape_and_bytes() -> None:
    data = dataset(5)
    assert data_digest(data, [0, 2, 4]) == reference_digest(data, [0, 2, 4])
    changed = {
        "bytes": [(x + (i == 2), y) for i, (x, y) in enumerate(data)],
        "label": [(x, y + (i == 2)) for i, (x, y) in enumerate(data)],
        "dtype": [(x.double(), y) for x, y in data],
        "shape": [(x.reshape(1, 4), y) for x, y in data],
    }
    for what, other in changed.items():
        assert data_digest(other, [0, 2, 4]) != data_digest(data, [0, 2, 4]), what
    assert data_digest(data, [0, 2]) != data_digest(data, [2, 0])  # which example is where is part of the data
    assert data_digest(data, [1]) != data_digest([data[1]], [0])  # so is its index


def test_a_tensor_with_a_graph_or_a_numpy_array_digests_as_its_values() -> None:
    data = dataset(3)
    with_graph = [(x.clone().requires_grad_(True) * 1.0, torch.tensor(y)) for x, y in data]
    as_numpy = [(x.numpy(), y) for x, y in data]
    assert data_digest(with_graph, [0, 1, 2]) == data_digest(as_numpy, [0, 1, 2]) == data_digest(data, [0, 1, 2])


@pytest.mark.parametrize(("count", "expected"), [(256, 256), (DIGESTED, 1024), (5000, 3000)],
                         ids=["training-default", "evaluation", "more-than-there-are"])  # ids not built from values
def test_a_fingerprint_reads_count_evenly_spaced_examples_and_records_how_many_there_are(count, expected) -> None:
    data = dataset(3000)
    chosen = [i * 3000 // expected for i in range(expected)] if expected < 3000 else list(range(3000))
    assert data_fingerprint(data, None, count) == f"3000:{reference_digest(data, chosen)}"
    indices = list(range(0, 3000, 3))  # over a selection: its own examples, evenly spaced
    chosen = [indices[i * 1000 // min(count, 1000)] for i in range(min(count, 1000))]
    assert data_fingerprint(data, indices, count) == f"1000:{reference_digest(data, chosen)}"


def test_digests_recorded_by_this_version_still_match() -> None:
    """Values written by smoothadv 0.1.0: a change of the format or of the number of examples read (the default 256 of
    a training run's data_sha256, DIGESTED of an evaluation's) would make every recorded run unresumable."""
    data = dataset(3000)
    assert data_digest(data, [0, 1, 2]) == "5270e8fc52ef397bc66212fff043c8ec108a06634791b74792e3ce25074e2505"
    assert data_fingerprint(data) == "3000:b41b8450cfba32d1d7b4dde592bca181fa14fdf95c9db7180b1e843e76f53948"
    assert data_fingerprint(data, None, DIGESTED) == \
        "3000:7a574f7a6e528eb4cad6a6daa57a3ddaee3c39eba9655baa1f303df61615d2a8"
    assert np.array_equal(data[2][0].numpy(), np.array([[[2.0, 3.0], [4.0, 5.0]]], dtype=np.float32))
