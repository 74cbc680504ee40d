"""No unsafe loading: a checkpoint whose unpickling would run code is refused before anything runs.

Each crafted file holds an object whose `__reduce__` makes unpickling call `open(marker, "w")`; the test
asserts the marker file never appears, whatever the entry point (library, CLI certify/predict/train
--pretrained, convert-checkpoint without --trust), and that the message names the way out.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from smoothadv import SmoothAdvError, load_checkpoint
from smoothadv.cli import main
from smoothadv.models import build_model, read_checkpoint


class Payload:
    """Unpickling this object calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _state() -> dict:
    return {k: v.clone() for k, v in build_model("toy_cnn", "synthetic").state_dict().items()}


def craft(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / f"evil-{kind}.pth.tar"
    evil = Payload(marker)
    if kind == "zip":
        torch.save({"arch": "toy_cnn", "state_dict": _state(), "extra": evil}, path)
    elif kind == "legacy":
        torch.save({"arch": "toy_cnn", "state_dict": _state(), "extra": evil}, path,
                   _use_new_zipfile_serialization=False)
    elif kind == "in_state_dict":
        state = _state()
        state["1.fc.weight"] = evil  # type: ignore[assignment]
        torch.save({"arch": "toy_cnn", "state_dict": state}, path)
    elif kind == "raw_pickle":
        with open(path, "wb") as handle:
            pickle.dump({"arch": "toy_cnn", "state_dict": {}, "extra": evil}, handle)
    else:
        raise ValueError(kind)
    assert not marker.exists()
    return path, marker


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


@pytest.mark.parametrize("kind", ("zip", "legacy"))
def test_cli_refuses_malicious_checkpoint_everywhere(tmp_path, capsys, kind) -> None:
    path, marker = craft(tmp_path, kind)
    commands = [
        ["certify", str(path), "--sigma", "0.25", "--out", str(tmp_path / "c.tsv"), "--no-progress"],
        ["predict", str(path), "--sigma", "0.25", "--out", str(tmp_path / "p.tsv"), "--no-progress"],
        ["train", "--dataset", "synthetic", "--out", str(tmp_path / "run"), "--epochs", "1", "--pretrained",
         str(path), "--no-progress", "--device", "cpu"],
        ["convert-checkpoint", str(path), str(tmp_path / "converted.pth.tar")],  # no --trust
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        if argv[0] != "convert-checkpoint":
            assert "smoothadv convert-checkpoint IN OUT --trust" in err
        else:
            assert "--trust" in err
    assert not marker.exists()
    assert not (tmp_path / "c.tsv").exists() and not (tmp_path / "converted.pth.tar").exists()


def test_trusted_legacy_file_converts_once_then_loads_weights_only(tmp_path) -> None:
    # a Cohen-style legacy checkpoint holding a harmless non-tensor object (here a Path), as released files
    # hold argparse Namespaces or optimizer objects: weights_only refuses it, --trust converts it
    state = {f"1.{k}": v for k, v in build_model("toy_cnn", "synthetic")[1].state_dict().items()}
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({"arch": "toy_cnn", "state_dict": state, "epoch": 7, "note": Path("harmless")}, legacy)
    with pytest.raises(SmoothAdvError, match="convert-checkpoint"):
        read_checkpoint(legacy)
    converted = tmp_path / "converted.pth.tar"
    assert main(["convert-checkpoint", str(legacy), str(converted), "--trust"]) == 0
    payload = read_checkpoint(converted)  # weights_only=True succeeds now
    assert payload["epoch"] == 7 and set(payload["state_dict"]) == set(state)
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in state.items())


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
