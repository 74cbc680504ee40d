"""`smoothadv train --objective smoothadv`, `attack`, `pseudo-label`, fine-tuning and self-training, end to end."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from smoothadv.cli import main
from smoothadv.data import get_dataset
from smoothadv.evaluate import ATTACK_COLUMNS
from smoothadv.models import build_model, load_checkpoint, normalization_spec, save_checkpoint

TINY = ["--dataset", "synthetic", "--train-subset", "128", "--eval-subset", "32", "--batch", "64", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def smoothadv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sa")
    argv = ["train", *TINY, "--out", str(out), "--epochs", "2", "--lr", "0.05", "--sigma", "0.25",
            "--objective", "smoothadv", "--attack", "pgd", "--eps", "0.5", "--steps", "2", "--m", "2",
            "--multi-noise", "--warmup", "2"]
    assert main(argv) == 0
    return out


def _rows(path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_smoothadv_training_records_objective_and_schedule(smoothadv_run) -> None:
    _, meta = load_checkpoint(smoothadv_run / "checkpoint.pth.tar")
    objective = meta["objective"]
    assert objective["name"] == "SmoothAdv" and objective["m"] == 2 and objective["multi_noise"] is True
    assert objective["attack"]["eps"] == 0.5  # last epoch of a 2-epoch warm-up: the full eps
    log = (smoothadv_run / "log.tsv").read_text().splitlines()
    assert len(log) == 3


@pytest.mark.parametrize("extra", [["--m", "4"], ["--base-attack"], ["--attack", "ddn", "--steps", "3"]],
                         ids=["smoothadv-m4", "base", "ddn"])
def test_attack_writes_documented_tsv(smoothadv_run, tmp_path, capsys, extra) -> None:
    out = tmp_path / "attack.tsv"
    eps = 0.5
    code = main(["attack", str(smoothadv_run / "checkpoint.pth.tar"), "--sigma", "0.25", "--eps", str(eps),
                 "--steps", "4", "--n", "100", "--alpha", "0.01", "--batch", "100", "--skip", "32", "--max", "4",
                 "--out", str(out), "--no-progress", "--device", "cpu", *extra])
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert tuple(rows[0].keys()) == ATTACK_COLUMNS
    test = get_dataset("synthetic", "test")
    assert [int(r["idx"]) for r in rows] == [0, 32, 64, 96]
    for row in rows:
        assert int(row["label"]) == int(test[int(row["idx"])][1])
        assert int(row["correct"]) == int(int(row["predict"]) == int(row["label"]))
        assert float(row["eps"]) == eps and 0.0 <= float(row["norm"]) <= eps + 1e-6
        assert row["time"].startswith("0:00:")
    if "--base-attack" not in extra and "ddn" not in extra:  # PGD without random start uses (almost) all of eps
        assert all(float(r["norm"]) > 0.4 for r in rows)


def test_attack_eps_zero_leaves_inputs_alone(smoothadv_run, tmp_path) -> None:
    out = tmp_path / "a0.tsv"
    assert main(["attack", str(smoothadv_run / "checkpoint.pth.tar"), "--sigma", "0.25", "--eps", "0", "--n", "50",
                 "--batch", "50", "--max", "3", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert [float(r["norm"]) for r in _rows(out)] == [0.0, 0.0, 0.0]


def test_pseudo_label_then_self_training_and_fine_tuning(smoothadv_run, tmp_path, capsys) -> None:
    ckpt = smoothadv_run / "checkpoint.pth.tar"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)  # (N, H, W, C) uint8, the documented format
    np.savez(tmp_path / "unlabelled.npz", images=images)
    labelled = tmp_path / "labelled.npz"
    assert main(["pseudo-label", str(ckpt), "--images", str(tmp_path / "unlabelled.npz"), "--out", str(labelled),
                 "--device", "cpu"]) == 0
    with np.load(labelled) as archive:
        assert np.array_equal(archive["images"], images)
        labels = archive["labels"]
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert labels.dtype == np.int64 and np.array_equal(labels, expected)
    # an existing output is not overwritten without --force
    assert main(["pseudo-label", str(ckpt), "--images", str(tmp_path / "unlabelled.npz"), "--out", str(labelled),
                 "--device", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err

    # self-training: the pseudo-labelled set mixed in batch by batch with a loss weight
    assert main(["train", *TINY, "--out", str(tmp_path / "self"), "--epochs", "1", "--unlabelled", str(labelled),
                 "--unlabelled-weight", "0.5", "--objective", "smoothadv", "--eps", "0.25", "--steps", "1"]) == 0
    assert len((tmp_path / "self" / "log.tsv").read_text().splitlines()) == 2

    # fine-tuning from a checkpoint with another class count: the head is replaced, the body kept
    torch.manual_seed(123)
    pre = build_model("toy_cnn", "synthetic", classes=10)
    save_checkpoint(tmp_path / "pre.pth.tar", pre, arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic", "normalize"), sigma=0.25, num_classes=10)
    assert main(["train", *TINY, "--out", str(tmp_path / "ft"), "--epochs", "1", "--lr", "1e-6",
                 "--pretrained", str(tmp_path / "pre.pth.tar")]) == 0
    tuned, meta = load_checkpoint(tmp_path / "ft" / "checkpoint.pth.tar")
    assert meta["num_classes"] == 4 and tuned[1].fc.out_features == 4
    assert torch.allclose(tuned[1].conv.weight, pre[1].conv.weight, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["train", *TINY, "--objective", "smoothadv", "--eps", "-1"], "--eps"),
    (["train", *TINY, "--objective", "smoothadv", "--steps", "0"], "--steps"),
    (["train", *TINY, "--objective", "smoothadv", "--m", "0"], "--m"),
    (["train", *TINY, "--objective", "smoothadv", "--attack", "cw"], "--attack: invalid choice: 'cw'"),
    (["train", *TINY, "--objective", "smoothadv", "--warmup", "5", "--epochs", "3"], "longer than training"),
    (["train", *TINY, "--pretrained", "{fashion}"], "architecture"),
    (["attack", "{ckpt}", "--sigma", "0.25", "--eps", "-0.5"], "--eps"),
    (["attack", "{ckpt}", "--sigma", "0.25", "--eps", "0.5", "--attack", "fgsm"], "--attack: invalid choice"),
    (["attack", "{ckpt}", "--sigma", "0.25", "--eps", "0.5", "--m", "0"], "--m"),
    (["attack", "{ckpt}", "--sigma", "0.25", "--eps", "0.5", "--gradient-free", "--base-attack"], "gradient-free"),
    (["pseudo-label", "{ckpt}", "--images", "{bad_npz}"], "images"),
])
def test_bad_input_is_one_line_error(smoothadv_run, tmp_path, capsys, argv, message) -> None:
    fashion = tmp_path / "fashion.pth.tar"
    save_checkpoint(fashion, build_model("fashion_cnn", "fashion_mnist"), arch="fashion_cnn", dataset="fashion_mnist",
                    normalization=normalization_spec("fashion_mnist", "normalize"), sigma=0.25)
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 5, 5), dtype=np.uint8))
    names = {"ckpt": smoothadv_run / "checkpoint.pth.tar", "fashion": fashion, "bad_npz": tmp_path / "bad.npz"}
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / ("o.tsv" if argv[0] == "attack" else "o"))]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
