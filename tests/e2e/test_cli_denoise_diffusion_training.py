"""`smoothadv train-diffusion` through the command line: its flags are DiffusionTrainSettings' fields and its
run equals train_ddpm's; refusals are one line. Skipped when the optional dependency diffusers is missing."""

from __future__ import annotations

import pytest
import torch
from conftest import ddpm_checkpoint, ddpm_train_settings, one_line_error

pytest.importorskip("diffusers")

from smoothadv.cli import main  # noqa: E402
from smoothadv.diffusion import train_ddpm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_settings_and_cli_errors(tmp_path, capsys):
    one_line_error(lambda: ddpm_train_settings(tmp_path, norm_groups=3), "--norm-groups 3")
    one_line_error(lambda: ddpm_train_settings(tmp_path, attention_levels=(2,)), "--attention-levels")
    one_line_error(lambda: ddpm_train_settings(tmp_path, ema_decay=1.0), "--ema-decay")
    (tmp_path / "log.tsv").write_text("")
    assert main(["train-diffusion", "--out", str(tmp_path), "--dataset", "synthetic", "--channels", "8", "16",
                 "--attention-levels", "1"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    for words, message in ((["--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
                           (["--out", "x", "--epochs", "1.5"], "--epochs: expected an integer"),
                           (["--out", "x", "--resume", "yes"], "unrecognized arguments: yes"),
                           (["--epochs", "2"], "--out")):
        assert main(["train-diffusion", *words]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert main(["train-diffusion", "--help"]) == 0
    assert "--attention-levels" in capsys.readouterr().out


def test_train_diffusion_command_maps_onto_the_settings(tmp_path, capsys):
    """`smoothadv train-diffusion` flags are DiffusionTrainSettings' fields; its run equals train_ddpm's."""
    out = tmp_path / "cli"
    assert main(["train-diffusion", "--out", str(out), "--dataset", "synthetic", "--channels", "8", "16",
                 "--attention-levels", "1", "--norm-groups", "8", "--epochs", "1", "--batch", "8",
                 "--train-subset", "16", "--warmup-steps", "2", "--log-every", "2", "--save-every", "2",
                 "--seed", "3"]) == 0
    assert f"model: {out / 'model'}" in capsys.readouterr().out
    train_ddpm(ddpm_train_settings(tmp_path / "lib", epochs=1, train_subset=16))
    a, b = ddpm_checkpoint(out), ddpm_checkpoint(tmp_path / "lib")
    assert a["config"] == {**b["config"], "out_dir": str(out)}
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
