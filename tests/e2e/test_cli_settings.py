"""Typed settings through the command line: a bad recipe is one line and trains nothing, `run_evaluation` (the
durable run as a library call) writes what `smoothadv certify` writes and resumes as it does, and an attack at
several radii is one resumable, shardable run.

The settings themselves (strict conversion, recipes, the factory) are tested in tests/unit/test_settings.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smoothadv import SmoothAdvError
from smoothadv.cli import main
from smoothadv.run import IGNORED_SETTINGS, read_settings, run_evaluation
from smoothadv.settings import CertifySettings, RunSettings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_bad_recipe_through_the_command_line_is_one_line_and_trains_nothing(tmp_path, capsys) -> None:
    path = write(tmp_path, 'dataset = "synthetic"\nobjective = "smoothadv"\nmulti_noise = "false"\n')
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multi_noise must be true or false" in err and str(path) in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "latin1.toml").write_bytes('dataset = "synth\xe9tic"\n'.encode("latin-1"))
    assert main(["train", "--config", str(tmp_path / "latin1.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "not valid UTF-8 TOML" in capsys.readouterr().err


def test_run_evaluation_is_the_library_call_behind_the_commands(toy_checkpoint, tmp_path, capsys) -> None:
    flags = ["--sigma", "0.25", "--n0", "10", "--n", "100", "--max", "5", "--batch", "64", "--seed", "2",
             "--no-progress", "--device", "cpu"]
    assert main(["certify", str(toy_checkpoint), "--out", str(tmp_path / "cli.tsv"), *flags]) == 0
    run = RunSettings(checkpoint=str(toy_checkpoint), out=tmp_path / "api.tsv", device="cpu", progress=False)
    settings = CertifySettings(sigma=0.25, n0=10, n=100, max=5, batch=64, seed=2)
    outcome = run_evaluation(run, settings, log=None)
    assert (outcome.rows, outcome.resumed) == (5, 0)

    def strip(path: Path) -> list[str]:
        return [line.rsplit("\t", 1)[0] for line in path.read_text().splitlines()]

    assert strip(tmp_path / "api.tsv") == strip(tmp_path / "cli.tsv")
    recorded = read_settings(tmp_path / "api.tsv")
    assert recorded is not None and recorded["n"] == 100 and recorded["command"] == "certify"
    cli_recorded = json.loads((tmp_path / "cli.tsv.args.json").read_text())
    assert {k: v for k, v in recorded.items() if k not in IGNORED_SETTINGS} == \
        {k: v for k, v in cli_recorded.items() if k not in IGNORED_SETTINGS}
    # resuming a finished run computes nothing; a changed setting is refused, or (demo) starts over
    again = run_evaluation(RunSettings(**{**run.__dict__, "resume": True}), settings, log=None)
    assert (again.rows, again.resumed) == (5, 5)
    changed = CertifySettings(sigma=0.25, n0=10, n=200, max=5, batch=64, seed=2)
    with pytest.raises(SmoothAdvError, match="n: 100 != 200"):
        run_evaluation(RunSettings(**{**run.__dict__, "resume": True}), changed, log=None)
    redone = run_evaluation(run, changed, restart_on_change=True, log=None)
    assert (redone.rows, redone.resumed) == (5, 0) and read_settings(tmp_path / "api.tsv")["n"] == 200


def test_attack_at_several_radii_is_one_resumable_run(toy_checkpoint, tmp_path) -> None:
    out = tmp_path / "attack.tsv"
    flags = [str(toy_checkpoint), "--sigma", "0.25", "--eps", "0", "0.25", "--steps", "2", "--m", "2", "--n", "50",
             "--max", "3", "--batch", "64", "--no-progress", "--device", "cpu"]
    assert main(["attack", *flags, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [line.split("\t")[4] for line in lines[1:]] == ["0.0"] * 3 + ["0.25"] * 3
    assert [line.split("\t")[0] for line in lines[1:]] == ["0", "1", "2"] * 2
    out.write_text("\n".join(lines[:5]) + "\n")  # killed after four rows
    assert main(["attack", *flags, "--out", str(out), "--resume"]) == 0
    assert [line.rsplit("\t", 1)[0] for line in out.read_text().splitlines()] == \
        [line.rsplit("\t", 1)[0] for line in lines]
    for i in (0, 1):
        assert main(["attack", *flags, "--out", str(tmp_path / "sharded.tsv"), "--shard", f"{i}/2"]) == 0
    assert main(["merge", str(tmp_path / "sharded.tsv")]) == 0
    assert [line.rsplit("\t", 1)[0] for line in (tmp_path / "sharded.tsv").read_text().splitlines()] == \
        [line.rsplit("\t", 1)[0] for line in lines]
