"""Denoised smoothing (Salman et al., NeurIPS 2020) through the command line: f o D certified through every
evaluation path (fixed, sequential, predict, attack, shards, resume, report), `train-denoiser` runs (MSE then
stability, resume by the one rule, divergence), and one-line refusals of bad denoisers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import certify_single_and_sharded, result_rows

from smoothadv.cli import main
from smoothadv.denoise import DnCNN
from smoothadv.models import load_denoiser, save_denoiser

EVAL = ["--sigma", "0.25", "--batch", "100", "--device", "cpu", "--no-progress", "--seed", "4"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def identity_denoiser(tmp_path_factory) -> Path:
    """A fresh 3-channel DnCNN (exactly the identity) saved for sigma 0.25."""
    path = tmp_path_factory.mktemp("den") / "identity.pth.tar"
    torch.manual_seed(1)
    save_denoiser(path, DnCNN(3, depth=4, width=8), arch="dncnn_small", dataset="synthetic", sigma=0.25, epoch=0)
    return path


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("smoothadv: error: ") and match in err, err


EVALUATIONS = {
    "certify": ["certify", "--n0", "20", "--n", "300", "--max", "5"],
    "sequential": ["certify", "--mode", "sequential", "--looks", "64:1024", "--max", "4"],
    "predict": ["predict", "--n", "200", "--max", "4"],
    "attack": ["attack", "--eps", "0.25", "--steps", "2", "--m", "2", "--n", "100", "--max", "3"],
}


@pytest.mark.parametrize("command", list(EVALUATIONS))
def test_identity_denoiser_gives_exactly_the_classifiers_rows(command, toy_checkpoint, identity_denoiser,
                                                              tmp_path) -> None:
    argv = [EVALUATIONS[command][0], str(toy_checkpoint), *EVALUATIONS[command][1:], *EVAL]
    assert main([*argv, "--out", str(tmp_path / "f.tsv")]) == 0
    assert main([*argv, "--out", str(tmp_path / "fd.tsv"), "--denoiser", str(identity_denoiser)]) == 0
    assert result_rows(tmp_path / "fd.tsv") == result_rows(tmp_path / "f.tsv")
    recorded = json.loads((tmp_path / "fd.tsv.args.json").read_text())
    assert recorded["denoiser_sha256"] == _sha(identity_denoiser) and recorded["denoiser_sigma"] == 0.25
    assert recorded["checkpoint_sha256"] == _sha(toy_checkpoint)
    assert "denoiser_sha256" not in json.loads((tmp_path / "f.tsv.args.json").read_text())


@pytest.fixture(scope="module")
def trained_denoiser(toy_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mse")
    assert main(["train-denoiser", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--batch", "64",
                 "--train-subset", "128", "--eval-subset", "32", "--depth", "3", "--width", "8", "--no-progress",
                 "--device", "cpu", "--classifier", str(toy_checkpoint)]) == 0
    return out / "denoiser.pth.tar"


def test_shards_resume_and_report_with_a_denoiser(toy_checkpoint, trained_denoiser, tmp_path, capsys) -> None:
    flags = [str(toy_checkpoint), "--denoiser", str(trained_denoiser), "--n0", "20", "--n", "200", "--max", "6", *EVAL]
    single, sharded = certify_single_and_sharded(flags, tmp_path)
    assert json.loads((tmp_path / "sharded.tsv.args.json").read_text())["denoiser_sha256"] == _sha(trained_denoiser)
    # resuming must use the same denoiser: leaving it out changes every row, so it is refused
    lines = single.read_text().splitlines()
    single.write_text("\n".join(lines[:4]) + "\n")
    _one_line_error(capsys, ["certify", *[f for f in flags if f != str(trained_denoiser) and f != "--denoiser"],
                             "--out", str(single), "--resume"], "denoiser_sha256")
    assert main(["certify", *flags, "--out", str(single), "--resume"]) == 0
    assert result_rows(single) == result_rows(sharded)
    capsys.readouterr()
    assert main(["report", f"fD={single}", "--radii", "0", "0.25"]) == 0
    assert "fD" in capsys.readouterr().out


def test_bad_denoisers_are_one_line_errors(toy_checkpoint, identity_denoiser, trained_denoiser, tmp_path,
                                           capsys) -> None:
    base = ["certify", str(toy_checkpoint), "--n", "100", "--max", "2", *EVAL]
    gray = tmp_path / "gray.pth.tar"
    save_denoiser(gray, DnCNN(1, depth=3, width=4), arch="dncnn_small", dataset="fashion_mnist", sigma=0.25)
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "a.tsv"), "--denoiser", str(gray)],
                    "takes 1-channel images, but the classifier's are 3x8x8")
    _one_line_error(capsys, [*base[:-len(EVAL)], *EVAL[2:], "--sigma", "0.5", "--out", str(tmp_path / "b.tsv"),
                             "--denoiser", str(identity_denoiser)], "trained for sigma 0.25, but --sigma is 0.5")
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(trained_denoiser.read_bytes()[:900])
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "c.tsv"), "--denoiser", str(corrupt)],
                    "is corrupt or truncated")
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "d.tsv"), "--denoiser", str(toy_checkpoint)],
                    "is a classifier checkpoint")
    _one_line_error(capsys, [*base[:1], str(identity_denoiser), *base[2:], "--out", str(tmp_path / "e.tsv")],
                    "is a denoiser checkpoint, not a classifier")
    assert not any((tmp_path / f"{name}.tsv").exists() for name in "abcde")
    _one_line_error(capsys, ["train-denoiser", "--dataset", "synthetic", "--out", str(tmp_path / "t"),
                             "--objective", "stability", "--no-progress", "--device", "cpu"], "give --classifier")


def test_mse_then_stability_through_the_cli_resumes_exactly(toy_checkpoint, trained_denoiser, tmp_path) -> None:
    common = ["train-denoiser", "--dataset", "synthetic", "--batch", "64", "--train-subset", "128", "--eval-subset",
              "32", "--depth", "3", "--width", "8", "--objective", "stability", "--init", str(trained_denoiser),
              "--classifier", str(toy_checkpoint), "--lr", "1e-3", "--no-progress", "--device", "cpu"]
    digest = _sha(toy_checkpoint)
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert _sha(toy_checkpoint) == digest  # f's file untouched
    straight, meta = load_denoiser(tmp_path / "straight" / "denoiser.pth.tar")
    resumed, _ = load_denoiser(tmp_path / "resumed" / "denoiser.pth.tar")
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())
    assert [stage["objective"]["name"] for stage in meta["history"]] == ["MSE", "Stability"]
    assert meta["history"][1]["classifiers"][0]["sha256"] == digest and meta["sigma"] == 0.25
    log = (tmp_path / "resumed" / "log.tsv").read_text().splitlines()
    assert log[0].split("\t")[:5] == ["epoch", "time", "lr", "train_loss", "test_mse"] and len(log) == 3


def _flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside the first tensor record of a torch zip file (torch does not check the CRC)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 16)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_denoiser_with_flipped_weight_bytes_is_refused(toy_checkpoint, trained_denoiser, tmp_path, capsys) -> None:
    assert load_denoiser(trained_denoiser)[1]["weights_verified"] is True
    corrupt = tmp_path / "flipped.pth.tar"
    corrupt.write_bytes(trained_denoiser.read_bytes())
    _flip_a_weight_byte(corrupt)
    torch.load(corrupt, weights_only=True)  # torch itself loads it without complaint
    _one_line_error(capsys, ["certify", str(toy_checkpoint), "--n", "100", "--max", "2", *EVAL, "--out",
                             str(tmp_path / "c.tsv"), "--denoiser", str(corrupt)],
                    "its weights do not match the digest")
    assert not (tmp_path / "c.tsv").exists()


DENOISER_RUN = ["train-denoiser", "--dataset", "synthetic", "--epochs", "1", "--batch", "32", "--train-subset", "64",
                "--eval-subset", "16", "--depth", "3", "--width", "4", "--no-progress", "--device", "cpu"]


def test_a_diverging_denoiser_stops_with_one_line_and_no_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    _one_line_error(capsys, [*DENOISER_RUN, "--lr", "1e6", "--optimizer", "sgd", "--out", str(out)],
                    "training diverged in epoch 1")
    assert not (out / "denoiser.pth.tar").exists() and not (out / "log.tsv").exists()


def test_denoiser_resume_follows_the_one_rule(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*DENOISER_RUN, "--out", str(out)]) == 0
    before = (out / "denoiser.pth.tar").read_bytes()
    _one_line_error(capsys, [*DENOISER_RUN, "--out", str(out), "--resume", "--lr", "0.5"], "--lr 0.001 -> 0.5")
    _one_line_error(capsys, [*DENOISER_RUN, "--out", str(out)], "exists; pass --resume")
    assert (out / "denoiser.pth.tar").read_bytes() == before
    assert main([*DENOISER_RUN[:4], "2", *DENOISER_RUN[5:], "--out", str(out), "--resume"]) == 0
    args = json.loads((out / "args.json").read_text())
    assert args["history"] == [{"resumed_at_epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert args["stage"]["objective"] == {"name": "MSE", "sigma": 0.25}
    assert (out / "log.tsv").read_text().count("\n") == 3
