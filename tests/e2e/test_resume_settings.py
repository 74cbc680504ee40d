"""Resume is exactly as strict as the rows require: rows do not depend on `--batch`, and a larger `--max` only
extends the selection, so both may change on `--resume` (recorded in OUT.args.json); every other change, a
smaller `--max`, or extending an attack at several radii is refused with one line and no file touched.
Shards may differ in batch size but must agree on `--max` to merge.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from smoothadv.cli import main
from smoothadv.run import resume_differences

FLAGS = ["--sigma", "0.25", "--n", "30", "--n0", "5", "--no-progress", "--device", "cpu"]


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def rows(path: Path) -> list[str]:
    """The rows without the time column (the only one that differs between runs)."""
    return [line.rsplit("\t", 1)[0] for line in path.read_text().splitlines()]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def certify(toy_checkpoint: Path):
    def go(out: Path, *extra: str) -> tuple[int, str]:
        return run(["certify", str(toy_checkpoint), "--out", str(out), *FLAGS, *extra])

    return go


def test_resume_may_change_the_batch_and_extend_max(certify, tmp_path) -> None:
    full, out = tmp_path / "full.tsv", tmp_path / "out.tsv"
    assert certify(full, "--max", "4")[0] == 0
    assert certify(out, "--max", "2", "--batch", "30")[0] == 0
    assert certify(out, "--max", "4", "--batch", "7", "--resume")[0] == 0
    assert rows(out) == rows(full)  # what one uninterrupted run writes
    recorded = json.loads((tmp_path / "out.tsv.args.json").read_text())
    assert (recorded["batch"], recorded["max"]) == (7, 4)
    assert recorded["resumed_changes"] == ["batch: 30 -> 7", "max: 2 -> 4"]
    assert certify(out, "--max", "5", "--resume")[0] == 0  # the history grows
    recorded = json.loads((tmp_path / "out.tsv.args.json").read_text())
    assert recorded["resumed_changes"] == ["batch: 30 -> 7", "max: 2 -> 4", "batch: 7 -> 1000", "max: 4 -> 5"]


@pytest.mark.parametrize("extra, word", [(["--max", "3"], "max: 4 != 3"), (["--max", "4", "--n", "40"], "n: 30 != 40"),
                                         (["--max", "4", "--seed", "1"], "seed: 0 != 1")])
def test_resume_refuses_what_changes_rows(certify, tmp_path, extra, word) -> None:
    out = tmp_path / "out.tsv"
    assert certify(out, "--max", "4")[0] == 0
    before = files(tmp_path)
    code, err = certify(out, "--resume", *extra)  # a flag given twice: the last one counts
    assert code == 2 and err.count("\n") == 1 and word in err and "Traceback" not in err, err
    assert files(tmp_path) == before


def test_an_attack_at_several_radii_cannot_be_extended(toy_checkpoint, tmp_path) -> None:
    out = tmp_path / "a.tsv"
    attack = ["attack", str(toy_checkpoint), "--out", str(out), "--sigma", "0.25", "--n", "20", "--steps", "1",
              "--eps", "0", "0.5", "--no-progress", "--device", "cpu"]
    assert run([*attack, "--max", "1"])[0] == 0
    before = files(tmp_path)
    code, err = run([*attack, "--max", "2", "--resume"])
    assert code == 2 and "several --eps" in err and err.count("\n") == 1, err
    assert files(tmp_path) == before
    assert run([*attack, "--max", "1", "--batch", "9", "--resume"])[0] == 0  # the batch may still change


def test_an_attack_records_its_recipe_nested_and_resumes_a_file_recorded_flat(toy_checkpoint, tmp_path) -> None:
    out = tmp_path / "d.tsv"
    attack = ["attack", str(toy_checkpoint), "--out", str(out), "--sigma", "0.25", "--n", "20", "--eps", "0.5",
              "--attack", "ddn", "--steps", "2", "--no-progress", "--device", "cpu"]
    assert run([*attack, "--max", "1"])[0] == 0
    sidecar = tmp_path / "d.tsv.args.json"
    recorded = json.loads(sidecar.read_text())
    assert recorded["attack"] == {"attack": "ddn", "steps": 2, "ddn_gamma": None, "ddn_init_norm": None,
                                  "ddn_quantize": True, "ddn_levels": 256}
    # the same output as an earlier version recorded it: the attack's settings flat beside the run's
    sidecar.write_text(json.dumps({**recorded, "attack": "ddn", "steps": 2, "random_start": False,
                                   "gradient_free": False}))
    before = files(tmp_path)
    code, err = run([*attack, "--max", "2", "--resume", "--ddn-levels", "16"])  # other rows: refused
    assert code == 2 and "attack: {" in err and err.count("\n") == 1, err
    assert files(tmp_path) == before
    code, err = run([*attack, "--max", "2", "--resume"])  # the same attack: the selection extends
    assert code == 0, err
    assert json.loads(sidecar.read_text())["attack"] == recorded["attack"]
    assert len(out.read_text().splitlines()) == 3


def test_shards_may_differ_in_batch_but_not_in_max(certify, tmp_path) -> None:
    whole, out = tmp_path / "whole.tsv", tmp_path / "m.tsv"
    assert certify(whole, "--max", "4")[0] == 0
    assert certify(out, "--max", "2", "--shard", "0/2", "--batch", "30")[0] == 0
    assert certify(out, "--max", "4", "--shard", "0/2", "--batch", "30", "--resume")[0] == 0  # extended shard
    assert certify(out, "--max", "4", "--shard", "1/2", "--batch", "7")[0] == 0
    assert run(["merge", str(out)])[0] == 0
    assert rows(out) == rows(whole)
    assert json.loads((tmp_path / "m.tsv.args.json").read_text())["batch"] == [30, 7]
    odd = tmp_path / "o.tsv"
    assert certify(odd, "--max", "4", "--shard", "0/2")[0] == 0
    assert certify(odd, "--max", "3", "--shard", "1/2")[0] == 0
    code, err = run(["merge", str(odd)])
    assert code == 2 and "max: 4 != 3" in err and not odd.exists(), err


def test_only_evaluations_may_change_their_batch() -> None:
    train = {"batch_size": 256, "batch": 256, "max": None, "lr": 0.1}
    assert resume_differences(train, {**train, "batch": 128}) == (["batch: 256 != 128"], [])
    certify = {"command": "certify", "batch": 1000, "max": 10, "n": 100}
    assert resume_differences(certify, {**certify, "batch": 10, "max": 20}) == (
        [], ["batch: 1000 -> 10", "max: 10 -> 20"])
    assert resume_differences(certify, {**certify, "max": None}) == ([], ["max: 10 -> None"])  # all examples
    refused, _ = resume_differences({**certify, "max": None}, {**certify, "max": 5})
    assert refused and "max: None != 5" in refused[0]
