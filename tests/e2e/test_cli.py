"""The command line end to end on the synthetic dataset, one-line errors for bad input, and the parser's choices
from the registries."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from smoothadv import data
from smoothadv.cli import main
from smoothadv.models import load_checkpoint
from smoothadv.stats import max_certifiable_radius


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--dataset", "synthetic", "--out", str(out), "--epochs", "3", "--lr", "0.05",
                 "--batch", "64", "--sigma", "0.25", "--no-progress", "--device", "cpu"]) == 0
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_checkpoint_log_and_provenance(trained) -> None:
    model, meta = load_checkpoint(trained / "checkpoint.pth.tar")
    assert meta["arch"] == "toy_cnn" and meta["dataset"] == "synthetic" and meta["sigma"] == 0.25
    assert meta["epoch"] == 3 and meta["objective"]["name"] == "GaussianAugmentation"
    log = (trained / "log.tsv").read_text().splitlines()
    assert log[0].split("\t") == ["epoch", "time", "lr", "train_loss", "train_acc", "test_loss", "test_acc_noisy"]
    assert len(log) == 4 and float(log[-1].split("\t")[-1]) > 0.9  # the toy task is easy under sigma = 0.25
    args = json.loads((trained / "args.json").read_text())
    env = json.loads((trained / "env.json").read_text())
    assert args["sigma"] == 0.25 and args["epochs"] == 3 and env["torch"] == torch.__version__


def test_certify_writes_cohen_tsv(trained, tmp_path, capsys) -> None:
    out = tmp_path / "certify.tsv"
    code, stdout, _ = _run(capsys, "certify", str(trained / "checkpoint.pth.tar"), "--sigma", "0.25", "--out", str(out),
                           "--n0", "50", "--n", "500", "--batch", "256", "--skip", "3", "--max", "8", "--no-progress")
    assert code == 0 and "wrote" in stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [0, 3, 6, 9, 12, 15, 18, 21]
    for _idx, label, predict, radius, correct, elapsed in rows:
        assert int(correct) == int(int(predict) == int(label))
        assert 0.0 <= float(radius) <= max_certifiable_radius(500, 0.001, 0.25)
        assert elapsed.startswith("0:00:")
    assert sum(int(r[4]) for r in rows) >= 7
    assert (tmp_path / "certify.tsv.args.json").exists()


def test_certify_is_reproducible_and_resumes(trained, tmp_path, capsys) -> None:
    ckpt = str(trained / "checkpoint.pth.tar")
    flags = ["--sigma", "0.25", "--n0", "20", "--n", "300", "--max", "6", "--no-progress", "--seed", "3"]
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    assert main(["certify", ckpt, "--out", str(a), *flags]) == 0
    partial = a.read_text().splitlines()[:4]
    b.write_text("\n".join(partial) + "\n" + "9\t1\t")  # three finished rows and a torn one
    # ... of a run killed after writing its settings sidecar (an output without one is not resumed)
    (tmp_path / "b.tsv.args.json").write_bytes((tmp_path / "a.tsv.args.json").read_bytes())
    assert main(["certify", ckpt, "--out", str(b), "--resume", *flags]) == 0
    strip = [line.rsplit("\t", 1)[0] for line in a.read_text().splitlines()]
    assert [line.rsplit("\t", 1)[0] for line in b.read_text().splitlines()] == strip
    capsys.readouterr()


def test_predict_writes_cohen_tsv(trained, tmp_path, capsys) -> None:
    out = tmp_path / "predict.tsv"
    code, _, _ = _run(capsys, "predict", str(trained / "checkpoint.pth.tar"), "--sigma", "0.25", "--out", str(out),
                      "--n", "200", "--max", "5", "--no-progress")
    assert code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tcorrect\ttime" and len(lines) == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["certify", "{missing}", "--sigma", "0.25", "--out", "{tmp}/o.tsv"], "does not exist"),
        (["certify", "{garbage}", "--sigma", "0.25", "--out", "{tmp}/o.tsv"], "corrupt"),
        (["certify", "{ckpt}", "--sigma", "0", "--out", "{tmp}/o.tsv"], "--sigma"),
        (["certify", "{ckpt}", "--sigma", "-1", "--out", "{tmp}/o.tsv"], "--sigma"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--n0", "0", "--out", "{tmp}/o.tsv"], "--n0"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--n", "-5", "--out", "{tmp}/o.tsv"], "--n"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--alpha", "1.5", "--out", "{tmp}/o.tsv"], "--alpha"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--alpha", "0", "--out", "{tmp}/o.tsv"], "--alpha"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--batch", "0", "--out", "{tmp}/o.tsv"], "--batch"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--out", "{existing}"], "already exists"),
        (["certify", "{ckpt}", "--sigma", "0.25", "--out", "{existing}/sub/o.tsv"], "cannot create"),
        (["train", "--dataset", "nope", "--out", "{tmp}/r"], "--dataset"),
        (["train", "--dataset", "synthetic", "--arch", "nope", "--out", "{tmp}/r"], "--arch: invalid choice: 'nope'"),
        (["train", "--dataset", "synthetic", "--objective", "nope", "--out", "{tmp}/r"],
         "argument OBJECTIVE: invalid choice: 'nope'"),
    ],
)
def test_bad_input_is_one_line_error(trained, tmp_path, capsys, argv, message) -> None:
    existing = tmp_path / "exists.tsv"
    existing.write_text("keep me\n")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    names = {"missing": tmp_path / "nope.pth", "garbage": garbage, "ckpt": trained / "checkpoint.pth.tar",
             "tmp": tmp_path, "existing": existing}
    code, _, err = _run(capsys, *[a.format(**names) for a in argv])
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert existing.read_text() == "keep me\n"  # nothing already written is lost


@pytest.mark.slow
def test_python_dash_m_and_console_help() -> None:
    result = subprocess.run([sys.executable, "-m", "smoothadv", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "certify", "predict"):
        assert command in result.stdout


def test_cli_dataset_choices_and_default_arch_come_from_the_registry() -> None:
    from smoothadv.archs import architecture_names
    from smoothadv.cli import build_parser
    from smoothadv.train import recipe as train_recipe

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    train = commands.choices["train"]._actions
    assert tuple(next(action.choices for action in train if action.dest == "dataset")) == data.dataset_names()
    assert tuple(next(action.choices for action in train if action.dest == "arch")) == architecture_names()
    settings, _ = train_recipe({"dataset": "cifar10", "out": "unused"})
    assert settings.arch == data.DATASETS["cifar10"].default_arch
