"""Sharded certification: shards + merge equal one run, torchrun ranks auto-merge, kill + --resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smoothadv.accel import prepare_base
from smoothadv.cli import main
from smoothadv.errors import SmoothAdvError
from smoothadv.files import TsvLog

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(toy_checkpoint: Path) -> str:
    """A toy_cnn on the synthetic data with fixed random weights (its votes are what they are; rows must agree)."""
    return str(toy_checkpoint)


FLAGS = ["--sigma", "0.25", "--n", "200", "--n0", "20", "--batch", "100", "--max", "9", "--device", "cpu",
         "--no-progress", "--seed", "3"]


def _rows(path: Path) -> list[list[str]]:
    """Rows without the time column (the only column that depends on the run)."""
    lines = path.read_text().splitlines()
    assert lines[0].split("\t")[-1] == "time"
    return [line.split("\t")[:-1] for line in lines]


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cert.tsv"
    assert main(["certify", ckpt, "--out", str(out), *FLAGS]) == 0
    return out


def test_shards_then_merge_equal_a_single_run(ckpt, single, tmp_path, capsys) -> None:
    out = tmp_path / "cert.tsv"
    for i in (2, 0, 1):
        assert main(["certify", ckpt, "--out", str(out), "--shard", f"{i}/3", *FLAGS]) == 0
    assert [r[0] for r in _rows(Path(f"{out}.shard-1-of-3"))[1:]] == ["1", "4", "7"]  # round-robin shards
    assert not out.exists()
    assert main(["merge", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _rows(out) == _rows(single)
    assert [r[0] for r in _rows(out)[1:]] == [str(i) for i in range(9)]
    settings = json.loads((tmp_path / "cert.tsv.args.json").read_text())
    assert settings["n"] == 200 and len(settings["checkpoint_sha256"]) == 64


def test_torchrun_ranks_write_shards_and_the_last_one_merges(ckpt, single, tmp_path, monkeypatch) -> None:
    out = tmp_path / "cert.tsv"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 1 finishes first: no merge yet; rank 0 finishes last and merges
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(["certify", ckpt, "--out", str(out), *FLAGS]) == 0
        assert out.exists() == (rank == 0)
    assert _rows(out) == _rows(single)
    assert main(["certify", ckpt, "--out", str(out), "--shard", "0/2", *FLAGS]) == 2  # one way of splitting


def _shards(ckpt: str, out: Path, *extra: str) -> None:
    for i in range(2):
        assert main(["certify", ckpt, "--out", str(out), "--shard", f"{i}/2", *FLAGS, *extra]) == 0


def test_merge_refuses_disagreeing_missing_or_duplicated_shards(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "cert.tsv"
    _shards(ckpt, out)
    odd = tmp_path / "odd.tsv"
    assert main(["certify", ckpt, "--out", str(odd), "--shard", "1/2", *FLAGS, "--sigma", "0.5"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m1.tsv"), f"{out}.shard-0-of-2", f"{odd}.shard-1-of-2"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "sigma: 0.25 != 0.5" in err and len(err.strip().splitlines()) == 1

    assert main(["merge", str(tmp_path / "m2.tsv"), f"{out}.shard-0-of-2"]) == 2
    assert "missing shard(s) 1-of-2" in capsys.readouterr().err

    shard1 = Path(f"{out}.shard-1-of-2")
    lines = shard1.read_text().splitlines()
    shard1.write_text("\n".join(lines[:-1]) + "\n")  # a lost row
    assert main(["merge", str(out)]) == 2
    assert "incomplete: 1 of 4 rows missing (e.g. idx 7)" in capsys.readouterr().err
    shard1.write_text("\n".join([*lines, lines[-1]]) + "\n")  # a duplicated row
    assert main(["merge", str(out)]) == 2
    assert "index 7 twice" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_other_settings(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "cert.tsv"
    assert main(["certify", ckpt, "--out", str(out), *FLAGS]) == 0
    capsys.readouterr()
    assert main(["certify", ckpt, "--out", str(out), "--resume", *FLAGS, "--n", "300"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_tsvlog_resume_drops_torn_row_and_torn_header(tmp_path) -> None:
    path = tmp_path / "r.tsv"
    path.write_text("idx\tx\n0\ta\n1\tb\n2\t")  # killed while writing row 2
    with TsvLog(path, ["idx", "x"], resume=True) as log:
        assert log.done == {"0", "1"}
        log.write([2, "c"])
    assert path.read_text() == "idx\tx\n0\ta\n1\tb\n2\tc\n"
    path.write_text("id")  # killed while writing the header
    with TsvLog(path, ["idx", "x"], resume=True) as log:
        assert log.done == set()
    assert path.read_text() == "idx\tx\n"


def test_kill_mid_run_then_resume_loses_and_duplicates_nothing(ckpt, tmp_path) -> None:
    flags = ["--sigma", "0.25", "--n", "2000", "--n0", "20", "--batch", "1000", "--max", "12", "--device", "cpu",
             "--no-progress"]
    out = tmp_path / "cert.tsv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "smoothadv", "certify", ckpt, "--out", str(out), *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:  # header + at least 2 finished rows
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_text().count("\n") - 1
    assert 2 <= before < 12, "the run was not killed mid-way"
    assert main(["certify", ckpt, "--out", str(out), "--resume", *flags]) == 0  # stale lock is taken over
    reference = tmp_path / "ref.tsv"
    assert main(["certify", ckpt, "--out", str(reference), *flags]) == 0
    assert _rows(out) == _rows(reference)


def test_precision_options() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        plain = model(x)
        fast = prepare_base(model, "cpu", "bf16", channels_last=True)(x)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits
    with pytest.raises(SmoothAdvError, match="fp16 autocast needs a GPU"):
        prepare_base(model, "cpu", "fp16")


def test_fold_bn_gives_the_same_function_with_no_batchnorm_left() -> None:
    from smoothadv.accel import fold_batchnorm
    from smoothadv.models import build_model

    torch.manual_seed(2)
    model = build_model("cifar_resnet20", "cifar10")
    model.train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32) * 2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(8, 3, 32, 32)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(prepare_base(model, "cpu", fold_bn=True, channels_last=True)(x), expected,
                                   rtol=1e-4, atol=1e-4)
    assert float(expected.std(0).max()) > 0.01  # the check is not on a constant function


def test_fold_bn_refuses_an_untraceable_model() -> None:
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(SmoothAdvError, match="cannot fold BatchNorm"):
        prepare_base(Branchy(), "cpu", fold_bn=True)
