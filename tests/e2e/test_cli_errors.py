"""Tracebacks and unclear messages once found by trying hostile input: each bad input ends with exit status 2
and one clear `smoothadv: error:` line naming what is wrong (no traceback, no warnings), and leaves every file
as it was; the conventions (file modes, plot formats, --help defaults, progress output for logs) hold.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothadv import Smooth, SmoothAdvError
from smoothadv.cli import build_parser, main

TINY = ["--max", "2", "--n", "20", "--no-progress", "--device", "cpu"]
TRAIN = ["train", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "16", "--eval-subset", "8",
         "--batch", "8", "--no-progress", "--device", "cpu"]


def run(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the CLI run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), to compare before and after."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv: list[str], root: Path, *words: str) -> str:
    """Run argv in a directory `root`: exit status 2, one error line containing `words`, no traceback, no file
    under `root` added, changed or removed. Returns the error line."""
    before = files(root)
    code, _, err = run(argv)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("smoothadv"), err
    assert "Traceback" not in err and "Warning" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert files(root) == before
    return lines[0]


@pytest.fixture
def ckpt(toy_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "toy.pth.tar"
    copy.write_bytes(toy_checkpoint.read_bytes())
    return copy


# ------------------------------------------------------------------ tracebacks turned into one-line errors


def test_huge_batch_sizes_the_buffer_by_the_samples_drawn(ckpt, tmp_path) -> None:
    """--batch 99999999999999 gives the rows of an ordinary batch (rows do not depend on it), and an
    absurd number of samples in one batch is a one-line memory error, not an allocator traceback."""
    huge = "99999999999999"
    rows = {}
    for command, batch, extra in (("certify", "7", []), ("certify", huge, []), ("predict", huge, []),
                                  ("attack", huge, ["--eps", "0.5", "--steps", "1"])):
        out = tmp_path / f"{command}-{batch}.tsv"
        code, _, err = run([command, str(ckpt), "--sigma", "0.25", "--out", str(out), *TINY, *extra, "--batch", batch])
        assert code == 0, err
        rows[command, batch] = [line.rsplit("\t", 1)[0] for line in out.read_text().splitlines()]
    assert rows["certify", "7"] == rows["certify", huge]
    refused(["certify", str(ckpt), "--sigma", "0.25", "--out", str(tmp_path / "m.tsv"), *TINY, "--n", huge,
             "--batch", huge], tmp_path, "not enough memory", "--batch")


def test_huge_batch_in_the_api(linear_model) -> None:
    from conftest import image_with_margin

    x = image_with_margin(0.3)
    smooth = Smooth(linear_model, 2, 0.25)
    generator = torch.Generator().manual_seed(0)
    expected = smooth.certify(x, 10, 50, 0.01, 16, generator=generator)
    for batch in (10**14, 10**30):
        assert smooth.certify(x, 10, 50, 0.01, batch, generator=generator.manual_seed(0)) == expected
        assert smooth.certify_many([x, x], 10, 50, 0.01, batch, [generator.manual_seed(0), None])[0] == expected
        assert smooth.predict(x, 50, 0.01, batch, generator=generator.manual_seed(0)) in (0, 1)
        assert all(len(buffer) <= 120 for buffer in smooth.sampler._buffers.values())  # 2 x (10 + 50) at most
    with pytest.raises(SmoothAdvError, match="not enough memory for a batch of") as info:
        smooth.sample_counts(x, 10**14, 10**14)
    assert "\n" not in str(info.value)


def test_resume_onto_a_binary_output_is_refused(ckpt, tmp_path) -> None:
    out = tmp_path / "results.tsv"
    out.write_bytes(bytes(range(256)) * 4)
    refused(["certify", str(ckpt), "--sigma", "0.25", "--out", str(out), *TINY, "--resume"], tmp_path,
            "not a text (UTF-8) TSV file", str(out))


@pytest.mark.parametrize("arch", ["fashion_cnn", "cifar_resnet20", "lenet"])
def test_train_refuses_an_architecture_that_does_not_fit_before_writing(tmp_path, arch) -> None:
    run_dir = tmp_path / "run"
    refused([*TRAIN, "--arch", arch, "--out", str(run_dir)], tmp_path, f"architecture '{arch}' does not take "
            "synthetic images", "--arch toy_cnn")
    assert not run_dir.exists()  # no stray args.json (nor its directory)


def test_train_refuses_overflowing_hyperparameters_and_seeds(tmp_path) -> None:
    out = str(tmp_path / "run")
    for flags, word in ((["--lr", "1e300"], "--lr"), (["--momentum", "1e39"], "--momentum"),
                        (["--weight-decay", "1e300"], "--weight-decay"),
                        (["--seed", "99999999999999999999999"], "--seed"),
                        (["--lr", "1e30", "--lr-gamma", "1e10", "--epochs", "3", "--lr-step", "1"], "float32")):
        refused([*TRAIN, "--out", out, *flags], tmp_path, word)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("lr = 1e300\n")
    refused([*TRAIN, "--out", out, "--config", str(recipe)], tmp_path, "lr must be a number in (0, 3.4e38]")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("images", [np.array(["a", "b"]), np.zeros((2, 3, 8, 8), dtype=np.int64),
                                    np.zeros((2, 3, 8, 8), dtype=np.complex64)])
def test_pseudo_label_refuses_non_image_arrays(ckpt, tmp_path, images) -> None:
    source = tmp_path / "unlabelled.npz"
    np.savez(source, images=images)
    refused(["pseudo-label", str(ckpt), "--images", str(source), "--out", str(tmp_path / "labelled.npz"),
             "--device", "cpu"], tmp_path, "images must be uint8 (0..255) or float", str(images.dtype))


def test_pseudo_label_reads_big_endian_floats(ckpt, tmp_path) -> None:
    source = tmp_path / "unlabelled.npz"
    np.savez(source, images=np.full((3, 3, 8, 8), 0.5, dtype=">f4"))
    code, _, err = run(["pseudo-label", str(ckpt), "--images", str(source), "--out", str(tmp_path / "l.npz"),
                        "--device", "cpu"])
    assert code == 0, err


# ------------------------------------------------------------------ unclear or misdirected messages


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_pickle_exploit_is_named_unsafe_without_warnings(tmp_path, protocol) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth.tar"
    path.write_bytes(pickle.dumps({"arch": "toy_cnn", "state_dict": Exploit(marker)}, protocol=protocol))
    line = refused(["certify", str(path), "--sigma", "0.25", "--out", str(tmp_path / "o.tsv"), *TINY], tmp_path,
                   "could run code")
    assert "corrupt" not in line and ("unsafe pickle" in line or "convert-checkpoint" in line), line
    assert not marker.exists()


def test_checkpoint_that_is_a_directory(tmp_path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    refused(["certify", str(folder), "--sigma", "0.25", "--out", str(tmp_path / "o.tsv"), *TINY], tmp_path,
            "is a directory")


def _certify_tsv(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c.tsv"
    assert run(["certify", str(ckpt), "--sigma", "0.25", "--out", str(out), *TINY, "--n0", "5"])[0] == 0
    return out


def test_plot_onto_a_directory_names_it_not_a_temporary_file(ckpt, tmp_path) -> None:
    tsv = _certify_tsv(ckpt, tmp_path)
    folder = tmp_path / "plot.png"
    folder.mkdir()
    line = refused(["report", f"A={tsv}", "--plot", str(folder)], tmp_path, str(folder))
    assert ".tmp" not in line
    from smoothadv.files import atomic_write_text

    with pytest.raises(SmoothAdvError, match="is a directory"):
        atomic_write_text(folder, "x")


def test_full_disk_names_the_file_and_leaves_the_old_one(ckpt, tmp_path, monkeypatch) -> None:
    import smoothadv.files as files_module

    tsv = _certify_tsv(ckpt, tmp_path)
    table = tmp_path / "table.md"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files_module.os, "fsync", full)
    refused(["report", f"A={tsv}", "--out", str(table)], tmp_path, "No space left on device", str(table))
    old = tmp_path / "old.md"
    old.write_text("old table\n")
    with pytest.raises(SmoothAdvError, match=f"cannot write {old}: No space left on device"):
        files_module.atomic_write_text(old, "new table\n")
    assert old.read_text() == "old table\n" and not list(tmp_path.glob(".*.tmp"))
    log = files_module.TsvLog(tmp_path / "rows.tsv", ["idx"])

    class FullHandle(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log._handle = FullHandle()
    with pytest.raises(SmoothAdvError, match=f"cannot write {tmp_path / 'rows.tsv'}: No space left on device"):
        log.write([1])


def test_attack_with_overflowing_sigma_says_so(ckpt, tmp_path) -> None:
    line = refused(["attack", str(ckpt), "--sigma", "1e300", "--eps", "0.5", "--steps", "1",
                    "--out", str(tmp_path / "a.tsv"), *TINY], tmp_path, "overflow")
    assert "x contains" not in line


def test_merge_blames_the_shard_with_the_wrong_header(ckpt, tmp_path) -> None:
    out = tmp_path / "m.tsv"
    for shard in ("0/2", "1/2"):
        assert run(["certify", str(ckpt), "--sigma", "0.25", "--out", str(out), *TINY, "--shard", shard])[0] == 0
    odd = tmp_path / "m.tsv.shard-0-of-2"
    lines = odd.read_text().splitlines()
    odd.write_text("\n".join(["idx\tlabel\tpredict\tr\tcorrect\ttime", *lines[1:]]) + "\n")
    line = refused(["merge", str(out)], tmp_path, str(odd))
    assert "shard-1-of-2" not in line


def test_validity_checks_its_json_path_before_the_run(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    started = time.monotonic()
    code, out, err = run(["validity", "--trials", "100000", "--json", str(blocker / "results.json")])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert time.monotonic() - started < 10


def test_an_old_empty_lock_is_stale_and_a_fresh_one_is_respected(ckpt, tmp_path) -> None:
    out = tmp_path / "c.tsv"
    lock = Path(f"{out}.lock")
    lock.write_text("")
    refused(["certify", str(ckpt), "--sigma", "0.25", "--out", str(out), *TINY], tmp_path, "another run")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    code, _, err = run(["certify", str(ckpt), "--sigma", "0.25", "--out", str(out), *TINY])
    assert code == 0 and not lock.exists(), err


# ------------------------------------------------------------------ conventions


def test_atomic_writes_respect_the_umask_and_keep_an_existing_mode(tmp_path) -> None:
    from smoothadv.files import atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
        (tmp_path / "c.json").write_text("")
        os.chmod(tmp_path / "c.json", 0o640)
        atomic_write_text(tmp_path / "c.json", "{}")
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.json", "b.json", "c.json")}
    assert modes == {"a.json": 0o644, "b.json": 0o600, "c.json": 0o640}


def test_plot_writes_the_format_its_extension_names(ckpt, tmp_path) -> None:
    tsv = _certify_tsv(ckpt, tmp_path)
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for kind, start in magic.items():
        plot = tmp_path / f"fig.{kind}"
        code, _, err = run(["report", f"A={tsv}", "--plot", str(plot)])
        assert code == 0 and plot.read_bytes().startswith(start), err
    before = files(tmp_path)
    code, out, err = run(["report", f"A={tsv}", "--plot", str(tmp_path / "fig.jpg"), "--out", str(tmp_path / "t.md")])
    assert code == 2 and out == "" and ".png, .pdf or .svg" in err and files(tmp_path) == before


def test_help_shows_every_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.default in (None, False, argparse.SUPPRESS, []) or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "default" in action.help, (name, action.dest)
    for name, words in {"train": ["(default: 90)"], "validity": ["(default: 2000)"], "demo": ["(default: 4;"],
                        "pseudo-label": ["(default: 1000)"], "report": ["(default: markdown)", "clipped at 0"],
                        "attack": ["max(eps, 1e-3)"]}.items():
        text = " ".join(commands[name].format_help().split())
        assert all(word in text for word in words), name


def test_progress_for_logs_is_plain_lines(ckpt, tmp_path, monkeypatch) -> None:
    """Without a terminal (or with --no-progress), long runs print plain lines, never `\\r` bars: a line every
    LINE_INTERVAL seconds (0 here) for certify, one per epoch (and the periodic ones) for train."""
    import smoothadv.progress

    monkeypatch.setattr(smoothadv.progress, "LINE_INTERVAL", 0.0)
    for flag in ("--progress", "--no-progress"):
        code, _, err = run(["certify", str(ckpt), "--sigma", "0.25", "--out", str(tmp_path / f"c{flag}.tsv"),
                            *TINY, flag])
        assert code == 0 and "\r" not in err and "certify: 2/2 rows (100%)" in err, err
        code, out, err = run([*TRAIN, "--out", str(tmp_path / f"run{flag}"), flag])
        assert code == 0 and "\r" not in err and "epoch 1/1: 2/2 batches" in err and "epoch 1/1  loss" in out
    monkeypatch.setattr(smoothadv.progress, "LINE_INTERVAL", 3600.0)
    code, out, err = run(["certify", str(ckpt), "--sigma", "0.25", "--out", str(tmp_path / "quiet.tsv"), *TINY])
    assert code == 0 and err == ""  # a run shorter than the interval prints no progress line
