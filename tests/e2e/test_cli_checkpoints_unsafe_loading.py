"""No unsafe loading through the command line: a checkpoint whose unpickling would run code is refused by
certify, predict, train --pretrained and convert-checkpoint without --trust before anything runs (the marker file
never appears), and a trusted legacy file converts once, then loads weights-only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import craft

from smoothadv import SmoothAdvError
from smoothadv.cli import main
from smoothadv.models import build_model, read_checkpoint


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
