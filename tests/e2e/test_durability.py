"""No data lost: runs killed with SIGKILL mid-epoch, mid-checkpoint-write and mid-row resume exactly; corrupt files
are detected with a clear message and never overwritten without --force.

The kills are real: a forked child process (synthetic data, toy CNN) patches one library function to SIGKILL
itself at a chosen point, so nothing gets a chance to clean up. The child uses one CPU thread and so does the
in-process part, so floating point is bitwise reproducible between the interrupted and the uninterrupted runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import smoothadv.files as files_module
import smoothadv.train as train_module
from smoothadv import SmoothAdvError
from smoothadv.cli import main
from smoothadv.evaluate import CERTIFY_COLUMNS
from smoothadv.files import OutputLock, TsvLog
from smoothadv.models import build_model, normalization_spec, read_checkpoint, save_checkpoint
from smoothadv.objectives import GaussianAugmentation
from smoothadv.settings import TrainSettings
from smoothadv.train import fit

TRAIN = dict(dataset="synthetic", arch="toy_cnn", sigma=0.25, epochs=3, batch_size=64, lr=0.05, lr_step=1,
             lr_gamma=0.5, seed=3, train_subset=256, eval_subset=32, progress=False)


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_killed(work: Callable[[], None]) -> None:
    """Run `work` in a forked child (a real process, torch already imported) and assert it died by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 3
        try:
            torch.set_num_threads(1)
            work()
        except BaseException:  # noqa: BLE001 - report anything to the parent through the exit code
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child exit status {status}"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def state(path: Path) -> dict:
    return read_checkpoint(path)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for slot_a, slot_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(slot_a["momentum_buffer"], slot_b["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    for name in ("noise", "shuffle", "torch"):
        assert torch.equal(a["rng"][name], b["rng"][name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("full")
    with one_thread():
        path = fit(TrainSettings(out_dir=out, **TRAIN), GaussianAugmentation(0.25))
    return state(path), (out / "log.tsv").read_text().splitlines()


def _train(out: Path) -> None:
    fit(TrainSettings(out_dir=out, **TRAIN), GaussianAugmentation(0.25))


def test_training_killed_mid_epoch_resumes_to_identical_weights(tmp_path, uninterrupted) -> None:
    out = tmp_path / "run"
    real = train_module.train_epoch
    calls = []

    def dying(model, objective, optimizer, labelled, *args, **kwargs):
        calls.append(1)

        def batches():
            for i, batch in enumerate(labelled):
                if len(calls) == 3 and i == 2:  # two SGD steps into the third epoch
                    die()
                yield batch
        return real(model, objective, optimizer, batches(), *args, **kwargs)

    def work() -> None:
        train_module.train_epoch = dying
        _train(out)

    run_killed(work)
    assert state(out / "checkpoint.pth.tar")["epoch"] == 2
    with one_thread():
        fit(TrainSettings(out_dir=out, resume=True, **TRAIN), GaussianAugmentation(0.25))
    full_state, full_log = uninterrupted
    assert_same_training_state(state(out / "checkpoint.pth.tar"), full_state)
    log = (out / "log.tsv").read_text().splitlines()
    assert len(log) == len(full_log) == 4
    assert [line.split("\t")[3:] for line in log] == [line.split("\t")[3:] for line in full_log]  # losses, accs


def test_training_killed_mid_checkpoint_write_keeps_previous_checkpoint(tmp_path, uninterrupted) -> None:
    out = tmp_path / "run"
    real_replace = files_module.os.replace
    seen = []

    def dying_replace(src, dst, *args, **kwargs):
        if str(dst).endswith("checkpoint.pth.tar"):
            seen.append(dst)
            if len(seen) == 2:  # epoch 2's checkpoint: half written, then the power goes
                size = os.path.getsize(src)
                with open(src, "r+b") as handle:
                    handle.truncate(size // 2)
                die()
        return real_replace(src, dst, *args, **kwargs)

    def work() -> None:
        files_module.os.replace = dying_replace  # the child's own copy of the os module attribute
        _train(out)

    run_killed(work)
    ckpt = out / "checkpoint.pth.tar"
    assert state(ckpt)["epoch"] == 1  # the old checkpoint, intact
    assert list(out.glob(".checkpoint.pth.tar.*.tmp"))  # the torn temporary file never replaced it
    # without --resume or --force, the existing run is refused and left as it was
    before = ckpt.read_bytes()
    with pytest.raises(SmoothAdvError, match="--resume"):
        fit(TrainSettings(out_dir=out, **TRAIN), GaussianAugmentation(0.25))
    assert ckpt.read_bytes() == before
    with one_thread():
        fit(TrainSettings(out_dir=out, resume=True, **TRAIN), GaussianAugmentation(0.25))
    assert_same_training_state(state(ckpt), uninterrupted[0])


def test_truncated_or_garbage_checkpoint_is_reported_and_not_overwritten(tmp_path, uninterrupted) -> None:
    out = tmp_path / "run"
    out.mkdir()
    source = tmp_path / "good.pth.tar"
    model = build_model("toy_cnn", "synthetic")
    save_checkpoint(source, model, arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.25)
    data = source.read_bytes()
    for name, payload in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00" * 512), ("empty", b"")):
        ckpt = out / "checkpoint.pth.tar"
        ckpt.write_bytes(payload)
        with pytest.raises(SmoothAdvError, match="corrupt or truncated|not a model checkpoint") as info:
            fit(TrainSettings(out_dir=out, resume=True, **TRAIN), GaussianAugmentation(0.25))
        assert "\n" not in str(info.value), name
        assert ckpt.read_bytes() == payload, name  # never silently replaced
        code = main(["certify", str(ckpt), "--sigma", "0.25", "--out", str(tmp_path / f"{name}.tsv"),
                     "--no-progress", "--device", "cpu"])
        assert code == 2 and not (tmp_path / f"{name}.tsv").exists()


# ------------------------------------------------------------------ certify: killed mid-row, resumed


@pytest.fixture(scope="module")
def checkpoint(toy_checkpoint: Path) -> Path:
    return toy_checkpoint


def certify_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["certify", str(checkpoint), "--sigma", "0.25", "--out", str(out), "--n", "200", "--n0", "10",
            "--batch", "100", "--max", "12", "--alpha", "0.01", "--no-progress", "--device", "cpu", *extra]


def rows_without_time(path: Path) -> list[list[str]]:
    return [line.split("\t")[:-1] for line in path.read_text().splitlines()]


def test_certify_killed_mid_row_resumes_without_lost_or_duplicated_rows(tmp_path, checkpoint) -> None:
    full = tmp_path / "full.tsv"
    assert main(certify_args(checkpoint, full)) == 0
    out = tmp_path / "killed.tsv"
    real_write = TsvLog.write

    def dying_write(self, values):
        if len(self.done) == 5:  # the sixth row: half of it reaches the disk, then SIGKILL
            line = "\t".join(str(v) for v in values)
            self._handle.write(line[: len(line) // 2])
            self._handle.flush()
            os.fsync(self._handle.fileno())
            die()
        real_write(self, values)

    def work() -> None:
        TsvLog.write = dying_write
        main(certify_args(checkpoint, out))

    run_killed(work)
    text = out.read_text()
    assert len(text.splitlines()) == 7 and not text.endswith("\n")  # header, 5 rows, a torn sixth row
    assert Path(f"{out}.lock").exists()  # left behind by the killed process
    assert main(certify_args(checkpoint, out)) == 2  # exists: refused without --resume
    assert out.read_text() == text
    assert main(certify_args(checkpoint, out, "--resume")) == 0  # stale lock taken over, torn row redone
    rows = rows_without_time(out)
    assert rows == rows_without_time(full)  # same rows, same order: none lost, none duplicated
    assert len({r[0] for r in rows[1:]}) == 12
    assert not Path(f"{out}.lock").exists()


def test_corrupt_tsv_is_refused_on_resume_and_left_untouched(tmp_path, checkpoint) -> None:
    header = "\t".join(CERTIFY_COLUMNS)
    cases = {
        "malformed": f"{header}\n0\t1\t1\t0.5\t1\t0:00:01\nnot a row\n1\t1\t1\t0.5\t1\t0:00:01\n",
        "other_header": "idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n",
        "nul_bytes": f"{header}\n0\t1\t1\t0.5\t1\t0:00:01\n" + "\x00" * 40 + "\n",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.tsv"
        path.write_text(content)
        with pytest.raises(SmoothAdvError) as info:
            TsvLog(path, CERTIFY_COLUMNS, resume=True)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        assert main(certify_args(checkpoint, path, "--resume")) == 2
        assert path.read_text() == content, name


def test_concurrent_run_on_the_same_output_is_refused(tmp_path, checkpoint, capsys) -> None:
    out = tmp_path / "busy.tsv"
    with OutputLock(out):
        assert main(certify_args(checkpoint, out)) == 2
        assert "another run is writing" in capsys.readouterr().err
        assert not out.exists()
    assert main(certify_args(checkpoint, out)) == 0
    before = out.read_text()
    with OutputLock(out):
        assert main(certify_args(checkpoint, out, "--force")) == 2  # even --force waits for the other run
    assert out.read_text() == before


def test_concurrent_training_in_the_same_directory_is_refused(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out / "checkpoint.pth.tar"):
        with pytest.raises(SmoothAdvError, match="another run is writing"):
            fit(TrainSettings(out_dir=out, **TRAIN), GaussianAugmentation(0.25))
        with pytest.raises(SmoothAdvError, match="another run is writing"):
            fit(TrainSettings(out_dir=out, force=True, **TRAIN), GaussianAugmentation(0.25))
    assert not (out / "checkpoint.pth.tar").exists()
