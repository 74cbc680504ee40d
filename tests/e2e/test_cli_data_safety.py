"""Nothing lost, nothing silently wrong: one test per defect a hostile user found.

Each test runs the command line in-process (or the API, for item 7) and asserts the exit status, a
single `smoothadv: error:` line with no traceback, and the files' contents before and after.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_command as run

from smoothadv import Smooth, SmoothAdvError
from smoothadv.attacks import DDN, PGDL2, SteinPGDL2
from smoothadv.cli import main
from smoothadv.models import load_checkpoint
from smoothadv.smoothing import SoftSmoothed

TRAIN = ["train", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "32", "--eval-subset", "8",
         "--batch", "16", "--no-progress", "--device", "cpu"]
CERTIFY = ["--sigma", "0.25", "--n0", "5", "--n", "20", "--batch", "20", "--no-progress", "--device", "cpu"]
TSV = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n1\t2\t2\t0.3\t1\t0:00:01\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(call, *args) -> str:
    """The message of the SmoothAdvError `call(*args)` raises, checked to be one line."""
    with pytest.raises(SmoothAdvError) as info:
        call(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ 1. every command that writes refuses to overwrite


def test_report_convert_and_validity_refuse_to_overwrite_without_force(tmp_path, capsys) -> None:
    tsv = tmp_path / "v.tsv"
    tsv.write_text(TSV)
    table, plot = tmp_path / "table.md", tmp_path / "plot.png"
    table.write_text("keep me\n")
    plot.write_bytes(b"old picture")
    before = snapshot(tmp_path)
    for argv, message in [
        (["--out", str(tsv)], "also an input"), (["--plot", str(tsv)], "also an input"),
        (["--out", str(tsv), "--force"], "also an input"), (["--plot", str(tsv), "--force"], "also an input"),
        (["--out", str(table)], "already exists; pass --force"), (["--plot", str(plot)], "already exists"),
    ]:
        code, err = run(["report", f"A={tsv}", *argv], capsys)
        assert code == 2 and message in err, (argv, err)
        assert snapshot(tmp_path) == before
    assert run(["report", f"A={tsv}", "--out", str(table), "--force"], capsys)[0] == 0
    assert table.read_text().startswith("|") and tsv.read_text() == TSV

    # convert-checkpoint: an existing DST needs --force; DST may never be SRC
    legacy, dst = tmp_path / "legacy.pth.tar", tmp_path / "converted.pth.tar"
    torch.manual_seed(0)
    from smoothadv.models import build_model

    torch.save({"arch": "cifar_resnet20", "state_dict": build_model("cifar_resnet20", "cifar10").state_dict()},
               legacy)
    dst.write_bytes(b"precious")
    before = snapshot(tmp_path)
    for argv, message in [([str(legacy), str(dst), "--trust"], "already exists; pass --force"),
                          ([str(legacy), str(legacy), "--trust", "--force"], "also an input")]:
        code, err = run(["convert-checkpoint", *argv], capsys)
        assert code == 2 and message in err
        assert snapshot(tmp_path) == before
    assert run(["convert-checkpoint", str(legacy), str(dst), "--trust", "--force"], capsys)[0] == 0
    _, meta = load_checkpoint(dst, normalization="normalize")
    assert meta["weights_verified"] and legacy.read_bytes() == before["legacy.pth.tar"]

    # validity --json: refused before the (long) run starts
    report = tmp_path / "validity.json"
    report.write_text("{}")
    code, err = run(["validity", "--quick", "--trials", "1", "--json", str(report)], capsys)
    assert code == 2 and "already exists" in err and report.read_text() == "{}"


# ------------------------------------------------------------------ 2. train --resume refuses changed settings


def test_train_resume_refuses_changed_settings_and_records_an_extension(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert run([*TRAIN, "--out", str(out)], capsys)[0] == 0
    before = snapshot(out)
    for change in (["--sigma", "0.5"], ["--lr", "0.5"], ["--batch", "8"], ["--seed", "1"], ["--objective", "smoothadv"],
                   ["--eval-subset", "4"], ["--precision", "bf16"]):
        code, err = run([*TRAIN, "--out", str(out), "--resume", *change], capsys)
        assert code == 2 and "cannot resume" in err and change[0] in err, (change, err)
        assert snapshot(out) == before, change  # checkpoint, log.tsv and args.json untouched

    # a larger --epochs (with another --workers, --progress) extends the run exactly, and is recorded
    extended = [*TRAIN, "--out", str(out), "--resume", "--epochs", "2", "--workers", "0"]
    assert run(extended, capsys)[0] == 0
    history = json.loads((out / "args.json").read_text())["history"]
    assert history == [{"resumed_at_epoch": 1, "changed": {"epochs": [1, 2]}}]
    straight = tmp_path / "straight"
    assert run([*TRAIN, "--out", str(straight), "--epochs", "2"], capsys)[0] == 0
    resumed_weights = torch.load(out / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    straight_weights = torch.load(straight / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    assert (out / "log.tsv").read_text().count("\n") == 3

    before = snapshot(out)
    code, err = run([*TRAIN, "--out", str(out), "--resume"], capsys)  # --epochs 1 < the 2 already trained
    assert code == 2 and "already trained 2 epochs" in err and snapshot(out) == before


# ------------------------------------------------------------------ 3. demo redoes a step whose checkpoint was replaced


def test_demo_retrains_when_a_checkpoint_was_replaced(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "64", "--certify", "4", "--n", "50",
            "--attack-count", "0", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    gaussian = out / "gaussian" / "checkpoint.pth.tar"
    original, certified = gaussian.read_bytes(), (out / "certify_gaussian.tsv").read_text()
    shutil.copyfile(out / "smoothadv" / "checkpoint.pth.tar", gaussian)  # another model under the same name
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "cannot be resumed with these settings: training again" in text
    assert "train gaussian       ran" in text and "train smoothadv      reused" in text
    assert gaussian.read_bytes() == original  # retrained (deterministically), not reused
    rows = [line.split("\t")[:-1] for line in (out / "certify_gaussian.tsv").read_text().splitlines()]
    assert rows == [line.split("\t")[:-1] for line in certified.splitlines()]


# ------------------------------------------------------------ 4. certify --resume and report: each idx exactly once


def test_resume_refuses_unchecked_duplicated_or_foreign_rows_and_report_refuses_duplicates(
        toy_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "c.tsv"
    base = ["certify", str(toy_checkpoint), *CERTIFY, "--max", "6", "--out", str(out)]
    assert run(base, capsys)[0] == 0
    full = out.read_text()
    header, *rows = full.splitlines()
    sidecar = tmp_path / "c.tsv.args.json"
    settings = sidecar.read_text()

    def attempt(lines: list[str], message: str) -> None:
        out.write_text("\n".join(lines) + "\n")
        before = snapshot(tmp_path)
        code, err = run([*base, "--resume"], capsys)
        assert code == 2 and message in err, err
        assert snapshot(tmp_path) == before

    sidecar.unlink()
    attempt([header, *rows[:3]], "its recorded settings, is missing")
    sidecar.write_text(settings)
    attempt([header, *rows[:3], rows[1]], "second row for idx 1")
    attempt([header, *rows[:3], rows[0].replace("0\t", "100\t", 1)], "not part of this run (e.g. idx 100)")

    # a hole in the middle is refilled, and the file is put back in job order: an uninterrupted run's file
    out.write_text("\n".join([header, rows[0], *rows[2:]]) + "\n")
    assert run([*base, "--resume"], capsys)[0] == 0
    assert [r.split("\t")[:-1] for r in out.read_text().splitlines()] == [r.split("\t")[:-1] for r in full.splitlines()]

    # no sidecar but no rows either (killed right after the header): nothing to check, so it resumes
    out.write_text(header + "\n")
    sidecar.unlink()
    assert run([*base, "--resume"], capsys)[0] == 0 and out.read_text().count("\n") == 7

    # report counts each example once: a duplicated idx is refused, not counted twice
    doubled = tmp_path / "doubled.tsv"
    doubled.write_text(TSV + TSV.splitlines()[1] + "\n")
    code, err = run(["report", f"A={doubled}"], capsys)
    assert code == 2 and "idx 0 has two rows (lines 2 and 4)" in err
    assert doubled.read_text() == TSV + TSV.splitlines()[1] + "\n"


# ------------------------------------------------------------ 5. diverging training stops, keeps the last good one


def test_diverging_training_stops_and_never_saves_non_finite_weights(tmp_path, capsys) -> None:
    diverging = {"lr": ["--lr", "1e6", "--train-subset", "64", "--batch", "8"], "sigma": ["--sigma", "1e300"]}
    for name, flags in diverging.items():
        out = tmp_path / name
        code, err = run([*TRAIN, "--out", str(out), *flags], capsys)
        assert code == 2 and "training diverged in epoch 1" in err and "no checkpoint was written" in err, err
        assert not (out / "checkpoint.pth.tar").exists() and not (out / "log.tsv").exists()

    # epoch 1 is good; epoch 2's learning rate (0.1 x 1e8) diverges: the epoch-1 checkpoint stays as it was
    out = tmp_path / "late"
    flags = [*TRAIN, "--out", str(out), "--lr-step", "1", "--lr-gamma", "1e8", "--train-subset", "64", "--batch", "8"]
    assert run(flags, capsys)[0] == 0
    checkpoint, log = (out / "checkpoint.pth.tar").read_bytes(), (out / "log.tsv").read_text()
    code, err = run([*flags, "--resume", "--epochs", "2"], capsys)
    assert code == 2 and "diverged in epoch 2" in err and "still holds epoch 1, the last good one" in err, err
    assert (out / "checkpoint.pth.tar").read_bytes() == checkpoint and (out / "log.tsv").read_text() == log


# ------------------------------------------------------------------ 6. --config values are type-checked


@pytest.mark.parametrize("content, message", [
    (b'objective = "smoothadv"\nmulti_noise = "false"\n', "multi_noise must be true or false"),
    (b"epochs = true\n", "epochs must be an integer"), (b"epochs = 1.5\n", "epochs must be an integer"),
    (b"epochs = [1, 2]\n", "epochs must be an integer"), (b"sigma = -1\n", "sigma must be a number >= 0"),
    (b'dataset = "mnist"\n', "dataset must be one of"), (b'dataset = "caf\xe9"\n', "not valid UTF-8 TOML"),
    (b"seed = 99999999999999999999999\n", "seed must be an integer in [0, 9223372036854775807]"),
])
def test_config_values_are_type_checked_through_the_command_line(tmp_path, capsys, content, message) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(content)
    code, err = run(["train", "--config", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists() and recipe.read_bytes() == content


# ------------------------------------------------------------------ 7. the API refuses what it cannot answer


def test_api_refuses_wrong_channels_nan_inputs_bad_labels_and_accepts_a_stacked_batch(toy_checkpoint) -> None:
    model, meta = load_checkpoint(toy_checkpoint)
    smooth = Smooth(model, meta["num_classes"], 0.25)
    gray = torch.full((1, 8, 8), 0.5)  # a 1-channel image on a 3-channel model: normalization would broadcast it
    assert "3-channel images" in one_line(lambda: smooth.certify(gray, 10, 50, 0.01, 50))
    assert "3-channel images" in one_line(lambda: smooth.predict(gray, 50, 0.01, 50))

    x, y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    soft = SoftSmoothed(model, torch.randn(2, 2, 3, 8, 8) * 0.25)
    for attack, target in ((PGDL2(0.5, 2), model), (DDN(0.5, 2), model), (SteinPGDL2(0.5, 2), soft)):
        assert "NaN or Inf" in one_line(attack, target, nan, y)
        assert "[0, 4)" in one_line(attack, target, x, torch.tensor([0, 4]))
        assert ">= 0" in one_line(attack, target, x, torch.tensor([-1, 0]))
        assert attack(target, x, y).isfinite().all()

    batch = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stacked = smooth.certify_many(batch, 10, 50, 0.01, 50, [torch.Generator().manual_seed(i) for i in range(3)])
    single = [smooth.certify(batch[i], 10, 50, 0.01, 50, torch.Generator().manual_seed(i)) for i in range(3)]
    assert stacked == single
    assert "one batch (B, C, H, W)" in one_line(lambda: smooth.certify_many(batch[0], 10, 50, 0.01, 50))


# ------------------------------------------------------------ 8. a checkpoint with flipped weight bytes is refused


def _flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside the first tensor record of a torch zip file (torch does not check the CRC)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 16)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_weight_bytes_is_refused(toy_checkpoint, tmp_path, capsys) -> None:
    corrupt = tmp_path / "corrupt.pth.tar"
    shutil.copyfile(toy_checkpoint, corrupt)
    _flip_a_weight_byte(corrupt)
    torch.load(corrupt, weights_only=True)  # torch itself loads it without complaint
    before = snapshot(tmp_path)
    code, err = run(["certify", str(corrupt), *CERTIFY, "--max", "2", "--out", str(tmp_path / "c.tsv")], capsys)
    assert code == 2 and "is corrupt: its weights do not match the digest" in err
    assert snapshot(tmp_path) == before
    assert "corrupt" in one_line(lambda: load_checkpoint(corrupt))

    # files older than the digest still load, unverified; ours are verified
    old = tmp_path / "old.pth.tar"
    payload = torch.load(toy_checkpoint, weights_only=True)
    del payload["weights_sha256"]
    torch.save(payload, old)
    assert load_checkpoint(old)[1]["weights_verified"] is False
    assert load_checkpoint(toy_checkpoint)[1]["weights_verified"] is True


# ------------------------------------------------------------------ 9. a nonexistent --data-dir is refused


def test_a_nonexistent_data_dir_is_refused(toy_checkpoint, tmp_path, capsys) -> None:
    bogus = str(tmp_path / "no such folder")
    commands = [
        [*TRAIN, "--out", str(tmp_path / "run"), "--data-dir", bogus],
        ["certify", str(toy_checkpoint), *CERTIFY, "--max", "2", "--out", str(tmp_path / "out" / "c.tsv"),
         "--data-dir", bogus],
        ["demo", "--dataset", "synthetic", "--out", str(tmp_path / "demo"), "--data-dir", bogus, "--no-progress"],
    ]
    for argv in commands:
        code, err = run(argv, capsys)
        assert code == 2 and "no such folder (--data-dir) does not exist" in err, err
        assert list(tmp_path.iterdir()) == []  # no run folder, args.json or output was made
    (tmp_path / "a file").write_text("x")
    code, err = run([*TRAIN, "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "a file")], capsys)
    assert code == 2 and "is not a directory" in err and not (tmp_path / "run").exists()
