"""The scripts of benchmarks/ still run against the package: each one's --help, and method_cost.py's recipes.

The benchmarks are not part of the library, so a renamed function breaks them silently; these checks load every
script as `python benchmarks/X.py --help` does and build every recipe method_cost.py measures by default.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(str(p.relative_to(BENCHMARKS)) for p in BENCHMARKS.rglob("*.py"))


def load(name: str) -> ModuleType:
    return load_script(BENCHMARKS / f"{name}.py")


def test_the_scripts_are_found() -> None:
    assert {"certify_throughput.py", "method_cost.py", "sequential_vs_fixed.py", "mutation/run.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


# The U model (module docstring of method_cost.py) at each recipe's own T and m, from configs/fashion_mnist/.
U_MODEL = {"gaussian": 1, "stability": 2, "consistency": 2, "smoothadv": 3, "smoothmix": 20, "catrs": 24,
           "macer": 16, "consistency_adv": 44}


def test_method_cost_builds_every_default_recipe() -> None:
    bench = load("method_cost")
    root = BENCHMARKS.parent
    seen = {}
    for item in bench.COMPARISON:
        name, recipe = item.split("=", 1)
        objective, cfg = bench.build(root / recipe, 60000)
        assert cfg["dataset"] == "fashion_mnist" and cfg["sigma"] == 0.25
        seen[name] = bench.cost_models(objective)[0]
    assert seen == U_MODEL


def test_method_cost_measures_and_writes_its_tsv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("method_cost")
    out = tmp_path / "cost.tsv"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["method_cost.py", "gaussian=configs/fashion_mnist/cohen_gaussian_s0.25.toml",
                                      "stability=configs/fashion_mnist/stability_s0.25.toml", "--batches", "1",
                                      "--reps", "1", "--train-size", "512", "--tsv", str(out)])
    monkeypatch.chdir(BENCHMARKS.parent)
    bench.main()
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["name", "recipe", "objective", "cpu_s_per_epoch", "model", "formula", "pass_model"]
    assert [(r[0], r[2], r[4], r[6]) for r in rows[1:]] == [("gaussian", "gaussian", "1", "1"),
                                                          ("stability", "stability", "2", "2")]
    assert all(float(r[3]) > 0 for r in rows[1:])
    assert "| cohen_gaussian_s0.25.toml | gaussian |" in capsys.readouterr().out


def test_sequential_savings_compares_a_sequential_file_with_fixed_n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Mean passes, the saving, both tables on the common images and the decisions that differ, by hand."""
    head = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    sequential = tmp_path / "seq.tsv"  # the column's pre-0.2 name, n, is read as samples
    sequential.write_text(f"{head}\tn\tmode\n0\t1\t1\t0.60\t1\t0:00:01\t1100\tsequential/grid\n"
                          "1\t2\t2\t0.20\t1\t0:00:01\t5100\tsequential/grid\n"
                          "2\t3\t-1\t0.00\t0\t0:00:01\t100100\tsequential/grid\n")
    fixed = tmp_path / "fixed.tsv"  # image 1 certifies farther with fixed n; image 3 is not in the other file
    fixed.write_text(f"{head}\n0\t1\t1\t0.70\t1\t0:00:01\n1\t2\t2\t0.30\t1\t0:00:01\n2\t3\t-1\t0.00\t0\t0:00:01\n"
                     "3\t4\t4\t0.90\t1\t0:00:01\n")
    monkeypatch.setattr(sys, "argv", ["sequential_savings.py", "--sequential", f"grid={sequential}", "--fixed",
                                      str(fixed), "--radii", "0", "0.25", "0.5"])
    load("sequential_savings").main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| grid | 3 | 35,433 | 2.8x | 66.7 | 33.3 | 33.3 |"
    assert lines[4] == "| fixed n on the same images | 3 | 100,100 | 1x | 66.7 | 66.7 | 33.3 |"
    assert lines[5] == "| difference (pp), decisions differing | | max 33.3 pp | 1 of 9 | +0.0 | -33.3 | +0.0 |"
    monkeypatch.setattr(sys, "argv", ["sequential_savings.py", "--sequential", f"fixed={fixed}"])
    with pytest.raises(SystemExit, match="has no samples column"):
        load("sequential_savings").main()
