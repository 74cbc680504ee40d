"""No unsafe loading: a checkpoint whose unpickling would run code is refused before anything runs.

Each crafted file holds an object whose `__reduce__` makes unpickling call `open(marker, "w")`; the test
asserts the marker file never appears, whatever the library entry point, and that the message names the way
out (the command line's entry points: tests/e2e/test_cli_checkpoints_unsafe_loading.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import craft

from smoothadv import SmoothAdvError, load_checkpoint
from smoothadv.models import build_model, read_checkpoint

KINDS = ("zip", "legacy", "in_state_dict", "raw_pickle")


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, kind) -> None:
    path, marker = craft(tmp_path, kind)
    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(SmoothAdvError) as info:
            load(path)
        message = str(info.value)
        assert "\n" not in message
        if kind != "raw_pickle":  # a bare pickle is not a torch file at all: refused as unreadable
            assert "convert-checkpoint" in message and "--trust" in message, message
    assert not marker.exists()


def test_checkpoints_with_malformed_fields_are_one_line_errors(tmp_path) -> None:
    from smoothadv.models import FORMAT, normalization_spec

    state = build_model("toy_cnn", "synthetic").state_dict()
    good = {"format": FORMAT, "version": 1, "arch": "toy_cnn", "dataset": "synthetic", "num_classes": 4,
            "normalization": normalization_spec("synthetic"), "sigma": 0.25, "state_dict": state}
    bad = {
        "arch": {**good, "arch": ["toy_cnn"]}, "state_dict": {**good, "state_dict": "weights"},
        "state_dict values": {**good, "state_dict": {"1.fc.weight": [1.0, 2.0]}},
        "num_classes": {**good, "num_classes": "four"}, "dataset": {k: v for k, v in good.items() if k != "dataset"},
        "normalization": {**good, "normalization": {"kind": "normalize"}}, "sigma": {**good, "sigma": "0.25"},
        "not a dict": [1, 2, 3],
    }
    for name, payload in bad.items():
        path = tmp_path / "c.pth.tar"
        torch.save(payload, path)
        with pytest.raises(SmoothAdvError) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value), name
    torch.save(good, tmp_path / "good.pth.tar")
    model, meta = load_checkpoint(tmp_path / "good.pth.tar")
    assert meta["num_classes"] == 4 and meta["sigma"] == 0.25
