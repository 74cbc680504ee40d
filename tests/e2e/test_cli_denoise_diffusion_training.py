"""`smoothadv train-diffusion` through the command line: its flags are DiffusionTrainSettings' fields and its
run equals train_ddpm's; refusals are one line. Skipped when the optional dependency diffusers is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from smoothadv.cli import main  # noqa: E402
from smoothadv.diffusion import DiffusionTrainSettings, train_ddpm  # noqa: E402
from smoothadv.errors import SmoothAdvError  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread costs the least CPU time (restored for the rest of the suite)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_line_error(call, *match: str) -> str:
    with pytest.raises(SmoothAdvError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for part in match:
        assert part in text, text
    return text


def _settings(out: Path, **extra) -> DiffusionTrainSettings:
    values = dict(dataset="synthetic", channels=(8, 16), attention_levels=(1,), norm_groups=8, epochs=2,
                  batch_size=8, train_subset=24, warmup_steps=2, log_every=2, save_every=2, seed=3)
    return DiffusionTrainSettings(out_dir=out, **{**values, **extra})


def _state(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_settings_and_cli_errors(tmp_path, capsys):
    _one_line_error(lambda: _settings(tmp_path, norm_groups=3), "--norm-groups 3")
    _one_line_error(lambda: _settings(tmp_path, attention_levels=(2,)), "--attention-levels")
    _one_line_error(lambda: _settings(tmp_path, ema_decay=1.0), "--ema-decay")
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
    train_ddpm(_settings(tmp_path / "lib", epochs=1, train_subset=16))
    a, b = _state(out), _state(tmp_path / "lib")
    assert a["config"] == {**b["config"], "out_dir": str(out)}
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
