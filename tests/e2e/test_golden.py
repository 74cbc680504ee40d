"""Golden outputs: what every command produced before the settings redesign, kept bit for bit.

Fixed seeds on the synthetic dataset, through the command line (so flag handling is covered too):
one epoch of Gaussian training and of SmoothAdv training (PGD with multi-noise, and DDN), then
CERTIFY (fixed n, sequential grid and tolerance), PREDICT and the SmoothAdv attack (PGD, DDN,
gradient-free PGD) on the Gaussian model. The recorded checkpoint weights, training logs and result
rows (every column but `time`) live in `tests/golden/`.

On the machine kind that recorded them (same torch version and CPU capability, see `fingerprint`)
everything must be bit-identical. Elsewhere, float kernels may round differently, so weights are
compared to 1e-4 and rows must agree on at least 90% of their cells: still a real check, not a
tautology. Regenerate (only for a deliberate, explained change) with
`SMOOTHADV_REGEN_GOLDEN=1 python -m pytest tests/e2e/test_golden.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from smoothadv.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
REGEN = os.environ.get("SMOOTHADV_REGEN_GOLDEN") == "1"

TRAIN = ["--dataset", "synthetic", "--epochs", "1", "--batch", "64", "--train-subset", "256", "--eval-subset", "32",
         "--seed", "3", "--lr", "0.05", "--device", "cpu", "--no-progress"]
RUNS = {
    "gaussian": ["--objective", "gaussian", "--sigma", "0.25"],
    "smoothadv_pgd": ["--objective", "smoothadv", "--sigma", "0.25", "--attack", "pgd", "--eps", "0.5",
                      "--steps", "2", "--m", "2", "--multi-noise"],
    "smoothadv_ddn": ["--objective", "smoothadv", "--sigma", "0.5", "--attack", "ddn", "--eps", "1.0",
                      "--steps", "3", "--m", "2"],
}
EVAL = ["--sigma", "0.25", "--device", "cpu", "--no-progress", "--seed", "5", "--batch", "64"]
EVALUATIONS = {
    "certify_fixed": ["certify", "--n0", "20", "--n", "300", "--max", "8"],
    # recorded before adaptive selection became the default: these rows choose the class from all n0 samples
    "certify_sequential": ["certify", "--mode", "sequential", "--selection", "fixed", "--looks", "64:2048",
                           "--max", "6"],
    "certify_tolerance": ["certify", "--mode", "sequential", "--policy", "tolerance", "--tolerance", "0.1",
                          "--class-from", "label", "--looks", "64:1024", "--max", "4", "--skip", "3"],
    "predict": ["predict", "--n", "200", "--max", "8"],
    "attack_pgd": ["attack", "--eps", "0.25", "--steps", "3", "--m", "2", "--n", "100", "--max", "4"],
    "attack_ddn": ["attack", "--attack", "ddn", "--eps", "0.5", "--steps", "3", "--m", "2", "--n", "100",
                   "--max", "3"],
    "attack_stein": ["attack", "--gradient-free", "--eps", "0.25", "--steps", "2", "--m", "4", "--n", "100",
                     "--max", "3"],
}


def fingerprint() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _rows(path: Path) -> list[list[str]]:
    """Every line of a TSV without its time column (the only column that depends on the clock)."""
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    drop = lines[0].index("time")
    return [[cell for j, cell in enumerate(line) if j != drop] for line in lines]


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict[str, object]:
    """Run every recorded command once (one CPU thread, as recorded) and collect what they wrote."""
    tmp = tmp_path_factory.mktemp("golden")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, object] = {}
    try:
        for name, flags in RUNS.items():
            assert main(["train", "--out", str(tmp / name), *TRAIN, *flags]) == 0
            state = torch.load(tmp / name / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
            out[f"{name}.weights"] = {k: v for k, v in state["state_dict"].items()}
            out[f"{name}.log"] = _rows(tmp / name / "log.tsv")
        checkpoint = str(tmp / "gaussian" / "checkpoint.pth.tar")
        for name, (command, *flags) in EVALUATIONS.items():
            tsv = tmp / f"{name}.tsv"
            assert main([command, checkpoint, "--out", str(tsv), *EVAL, *flags]) == 0
            out[name] = _rows(tsv)
    finally:
        torch.set_num_threads(before)
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        torch.save({k: v for k, v in out.items() if k.endswith(".weights")}, GOLDEN / "weights.pt")
        text = {k: v for k, v in out.items() if not k.endswith(".weights")}
        (GOLDEN / "rows.json").write_text(json.dumps(text, indent=1) + "\n")
        (GOLDEN / "fingerprint.json").write_text(json.dumps(fingerprint()) + "\n")
    return out


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, object], bool]:
    weights = torch.load(GOLDEN / "weights.pt", map_location="cpu", weights_only=True)
    rows = json.loads((GOLDEN / "rows.json").read_text())
    exact = json.loads((GOLDEN / "fingerprint.json").read_text()) == fingerprint()
    return {**weights, **rows}, exact


@pytest.mark.parametrize("run", sorted(RUNS))
def test_training_weights_and_log(produced, golden, run) -> None:
    expected, exact = golden
    got, want = produced[f"{run}.weights"], expected[f"{run}.weights"]
    assert sorted(got) == sorted(want)  # type: ignore[arg-type]
    for key in want:  # type: ignore[union-attr]
        if exact:
            assert torch.equal(got[key], want[key]), f"{run}: {key} changed"  # type: ignore[index]
        else:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4)  # type: ignore[index]
    _compare(produced[f"{run}.log"], expected[f"{run}.log"], exact)


@pytest.mark.parametrize("name", sorted(EVALUATIONS))
def test_evaluation_rows(produced, golden, name) -> None:
    expected, exact = golden
    _compare(produced[name], expected[name], exact)


def _compare(got: object, want: object, exact: bool) -> None:
    assert isinstance(got, list) and isinstance(want, list)
    assert got[0] == want[0] and len(got) == len(want)  # header and row count always exact
    if exact:
        assert got == want
        return
    cells = [(a, b) for row_a, row_b in zip(got[1:], want[1:]) for a, b in zip(row_a, row_b)]
    agree = sum(a == b or _close(a, b) for a, b in cells)
    assert agree >= 0.9 * len(cells), f"only {agree} of {len(cells)} cells agree"


def _close(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
    except ValueError:
        return False
