"""benchmarks/sequential_vs_fixed.py replays exactly what `smoothadv certify` computes.

The comparison of sequential and fixed-n certification on real models (results/sequential/) is computed from
recorded count trajectories, so the replay must give the CLI's sequential rows (same noise
streams) and fixed-n CERTIFY's bound on the first n samples of the same estimation stream.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_script

from smoothadv.cli import main
from smoothadv.data import get_dataset
from smoothadv.models import load_checkpoint
from smoothadv.sequential import doubling_looks, stream_generator
from smoothadv.smoothing import PackedSampler, SampleRequest, Smooth
from smoothadv.stats import certified_radius, clopper_pearson_lower

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sequential_vs_fixed.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


COMMON = ["--sigma", "0.25", "--seed", "3", "--n0", "16", "--batch", "32"]


def certify_rows(checkpoint: Path, out: Path, count: int, options: list[str]) -> list[dict[str, str]]:
    """The rows `smoothadv certify --mode sequential` writes for every third image, `count` of them."""
    assert main(["certify", str(checkpoint), "--out", str(out), "--mode", "sequential", "--skip", "3",
                 "--max", str(count), "--no-progress", "--device", "cpu", *options]) == 0
    with out.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.slow
def test_replay_gives_the_cli_rows_and_fixed_n_certify(bench, toy_checkpoint, tmp_path, capsys) -> None:
    traj = tmp_path / "t.jsonl"
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(traj), "--skip", "3", "--max", "8", "--group", "3",
                       "--looks", "64", "512", "--n", "400", "--single", "0.3", *COMMON]) == 0
    records = bench.load(str(traj))
    assert [r["idx"] for r in records] == [0, 3, 6, 9, 12, 15, 18, 21]
    # a second run resumes: nothing is sampled twice
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(traj), "--skip", "3", "--max", "8",
                       "--looks", "64", "512", "--n", "400", *COMMON]) == 0
    assert len(bench.load(str(traj))) == 8

    looks = doubling_looks(64, 512)
    configs = bench.policies(0.25, 0.001, looks, [0.3])
    last = configs["betting grid"].schedule.last
    betting = ["--test", "betting", "--looks", f"4:{last}"]  # the benchmark's betting test
    grid_radii = ["--radii", *map(str, configs["grid"].schedule.radii)]
    runs = (("grid", ["--looks", "64:512"]), ("radius 0.3", ["--looks", "64:512", "--radii", "0.3"]),
            ("betting grid", [*betting, *grid_radii]), ("betting radius 0.3", [*betting, "--radii", "0.3"]))
    for name, options in runs:
        out = tmp_path / f"{name}.tsv"
        cli = certify_rows(toy_checkpoint, out, 8, [*options, *COMMON])
        for row, record in zip(cli, records, strict=True):
            test = bench.replay(configs[name], dict(zip(record["sizes"], record["counts"])))
            result = test.result()
            assert int(row["idx"]) == record["idx"]
            assert int(row["samples"]) == 16 + result.n
            assert int(row["predict"]) == (record["class"] if result.certified else -1)
            assert float(row["radius"]) == pytest.approx(result.radius, abs=1e-6)
        # the same comparison as a benchmark command (used on the real models: experiments/sequential/check_cli.sh)
        check = ["check", str(traj), "--tsv", str(out), "--sigma", "0.25", "--looks", "64", "512", "--single", "0.3",
                 "--policy", name]
        assert bench.main(check) == 0
        assert f"8 rows of {out} equal the replay of policy '{name}'" in capsys.readouterr().out
    tampered = tmp_path / "tampered.tsv"
    lines = (tmp_path / "grid.tsv").read_text().splitlines()
    fields = lines[2].split("\t")
    fields[6] = str(int(fields[6]) + 64)  # n of the second row
    tampered.write_text("\n".join([lines[0], lines[1], "\t".join(fields), *lines[3:]]) + "\n")
    assert bench.main(["check", str(traj), "--tsv", str(tampered), "--sigma", "0.25", "--looks", "64", "512"]) == 2
    assert "1 of 8 rows differ from the replay; first: image 3:" in capsys.readouterr().err

    # fixed n: the class of the 16 selection samples, the bound on the first 400 estimation samples
    model, meta = load_checkpoint(toy_checkpoint)
    smooth = Smooth(model, meta["num_classes"], 0.25)
    data = get_dataset("synthetic", "test", None)
    packed = PackedSampler(smooth.sampler)
    for record in records:
        x = data[record["idx"]][0]
        sel = packed.counts([SampleRequest(x, (16,), stream_generator(3, record["idx"], 0, "cpu"))], 32)
        est = packed.counts([SampleRequest(x, (400,), stream_generator(3, record["idx"], 1, "cpu"))], 32)
        c = int(sel[0].argmax())
        assert record["class"] == c and record["selection"] == sel[0].tolist()
        p_lower = clopper_pearson_lower(int(est[0, c]), 400, 0.001)
        expected = (c, certified_radius(p_lower, 0.25)) if p_lower > 0.5 else (-1, 0.0)
        assert bench.fixed_row(record, 400, 0.001, 0.25) == pytest.approx(expected)

    assert bench.main(["table", str(traj), "--looks", "64", "512", "--n", "400", "--sigma", "0.25",
                       "--single", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "| fixed n = 400 | 416 | 1x |" in printed and "| radius 0.3 |" in printed
    full = {line.split(" | ")[0]: line for line in printed.splitlines() if line.startswith("| ")}
    # --policies keeps those rows (the same lines) and fixed n's; a label-mode row brings fixed n's label row
    assert bench.main(["table", str(traj), "--looks", "64", "512", "--n", "400", "--sigma", "0.25", "--single", "0.3",
                       "--policies", "radius 0.3", "grid, label mode"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows == [full[f"| {name}"] for name in ("fixed n = 400", "fixed n = 400, label mode", "radius 0.3",
                                                   "grid, label mode")]
    assert bench.main(["table", str(traj), "--sigma", "0.25", "--policies", "gird"]) == 2
    assert "unknown policy 'gird'" in capsys.readouterr().err

    # CPU time = forward passes x the price of one: at 10 CPU-ms per pass, fixed n's 416 passes cost 4.16 CPU-s
    assert bench.main(["summary", f"{traj}:0.25", "--looks", "64", "512", "--n", "400", "--single", "0.3",
                       "--policies", "grid", "--ms-per-pass", "10"]) == 0
    printed = capsys.readouterr().out
    passes = float(next(line for line in printed.splitlines() if line.startswith("| all |")).split("|")[4]
                   .replace(",", ""))
    policy = passes * 10 / 1e3
    assert f"| grid | {policy:,.1f} | 4.2 | {4.16 - policy:,.1f} CPU-s ({1 - policy / 4.16:.1%}) |" in printed


def test_trajectories_extend_to_the_last_look_only_when_a_policy_needs_it(bench, toy_checkpoint, tmp_path) -> None:
    traj = tmp_path / "t.jsonl"
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(traj), "--max", "6", "--looks", "64", "512",
                       "--n", "400", *COMMON]) == 0
    configs = list(bench.policies(0.25, 0.001, doubling_looks(64, 512), [0.5]).values())
    top = bench.last_look(configs, 64)
    assert top == 512  # the fitted schedule adds a look (384) at alpha / 4; its last look keeps 512 at alpha / 2
    for record in bench.load(str(traj)):
        at = dict(zip(record["sizes"], record["counts"]))
        assert record["sizes"][-1] in (448, top) and 400 in at
        assert all(bench.replay(config, at) is not None for config in configs)
        short = {k: v for k, v in at.items() if k <= 448}
        assert (record["sizes"][-1] == top) == any(bench.replay(config, short) is None for config in configs)
        assert all(b >= a for a, b in zip(record["counts"], record["counts"][1:]))
        assert record["label_counts"][-1] <= record["sizes"][-1]


def test_bad_schedule_is_a_one_line_error(bench, toy_checkpoint, tmp_path, capsys) -> None:
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(tmp_path / "t.jsonl"), "--max", "1",
                       "--looks", "64", "512", "--n", "1000", *COMMON]) == 2
    assert "fixed n must be in [1, 512]" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").read_text()


def test_top_up_continues_the_same_noise_stream(bench, toy_checkpoint, tmp_path) -> None:
    # Trajectories cut back to the head (as if written under a shorter schedule, and without the `requests`
    # field of older files) are continued by a resumed `sample` to exactly the counts of an uncut run.
    full = tmp_path / "full.jsonl"
    args = ["--max", "12", "--looks", "64", "512", "--n", "400", "--group", "5", *COMMON]
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(full), *args]) == 0
    records = bench.load(str(full))
    extended = [r for r in records if r["sizes"][-1] == 512]
    assert extended and len(extended) < len(records)
    cut = tmp_path / "cut.jsonl"
    with cut.open("w") as handle:
        for r in records:
            keep = r["sizes"].index(448) + 1
            short = {**{k: v for k, v in r.items() if k != "requests"}, "sizes": r["sizes"][:keep],
                     "counts": r["counts"][:keep], "label_counts": r["label_counts"][:keep]}
            handle.write(json.dumps(short) + "\n")
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(cut), *args]) == 0
    again = {r["idx"]: r for r in bench.load(str(cut))}
    for r in records:
        for key in ("sizes", "counts", "label_counts"):
            assert again[r["idx"]][key] == r[key], (r["idx"], key)


def test_parts_gathered_equal_one_run(bench, toy_checkpoint, tmp_path, capsys) -> None:
    # Two `--part` processes (each skipping what the gathered file already holds) and `gather` give the records one
    # run writes, in its order (all but the timing): every image's noise streams depend on its index alone.
    args = ["--max", "7", "--looks", "64", "512", "--n", "400", "--group", "2", *COMMON]
    whole, gathered = tmp_path / "whole.jsonl", tmp_path / "gathered.jsonl"
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(whole), *args]) == 0
    gathered.write_text(whole.read_text().splitlines(keepends=True)[0])  # image 0, recorded before the split
    parts = [tmp_path / f"part{i}.jsonl" for i in (1, 2)]
    for i, part in enumerate(parts, 1):
        assert bench.main(["sample", str(toy_checkpoint), "--out", str(part), "--part", f"{i}/2",
                           "--also", str(gathered), *args]) == 0
    assert [r["idx"] for r in bench.load(str(parts[0]))] == [40, 80, 120]  # every other image of 0, 20, ..., 120
    assert [r["idx"] for r in bench.load(str(parts[1]))] == [20, 60, 100]
    assert bench.main(["gather", str(gathered), *map(str, parts)]) == 0

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in bench.load(str(path))]

    assert untimed(gathered) == untimed(whole) and len(untimed(whole)) == 7
    before = gathered.read_bytes()
    assert not any(part.exists() for part in parts)
    # an image recorded differently in a part is refused, and nothing is changed
    record = json.loads(whole.read_text().splitlines()[1])
    parts[0].write_text(json.dumps({**record, "counts": [c + 1 for c in record["counts"]]}) + "\n")
    capsys.readouterr()
    assert bench.main(["gather", str(gathered), str(parts[0])]) == 2
    assert "image 20: " in capsys.readouterr().err and gathered.read_bytes() == before
    assert parts[0].exists()
    with pytest.raises(SystemExit) as exited:
        bench.main(["sample", str(toy_checkpoint), "--out", str(parts[1]), "--part", "3/2", *args])
    assert exited.value.code == 2 and "--part: expected 1 <= I <= N, got '3/2'" in capsys.readouterr().err


@pytest.mark.slow
def test_expected_accuracy_is_exact_for_fixed_n_and_unbiased_for_a_full_schedule(bench) -> None:
    # Synthetic trajectories (no model): vote rates 1, 0.97 and 0.9 for the label, and one image whose selected
    # class is wrong. Fixed n = 400: the exact binomial tail, checked against a direct simulation of CERTIFY's
    # bound; the "full" policy (max of the bounds at 64..512 samples, alpha / 4 each) is checked the same way.
    import numpy as np
    from scipy.stats import norm

    from smoothadv.sequential import SequentialConfig

    def record(label: int, cls: int, p: float) -> dict:
        return {"label": label, "class": cls, "sizes": [512], "counts": [round(p * 512)], "selection": [1]}

    records = [record(0, 0, 1.0), record(1, 1, 0.96875), record(2, 2, 0.90625), record(3, 4, 0.9)]
    radii = (0.0, 0.25, 0.5)
    full = SequentialConfig(0.25, 0.001, looks=doubling_looks(64, 512), policy="full")
    fixed, sequential = bench.expected_accuracy(records, full, radii, 400, 0.001, reps=2000, seed=1)
    rng = np.random.default_rng(2)
    direct = np.zeros((2, len(radii)))
    targets = np.array([max(0.5 + 1e-12, norm.cdf(r / 0.25)) for r in radii])
    for rec in records[:3]:
        p = rec["counts"][0] / 512
        once = [clopper_pearson_lower(int(k), 400, 0.001) for k in rng.binomial(400, p, 2000)]
        paths = np.cumsum(rng.binomial((64, 64, 128, 256), p, (2000, 4)), axis=1)
        best = [max(clopper_pearson_lower(int(k), n, 0.00025) for n, k in zip((64, 128, 256, 512), path))
                for path in paths]
        direct[0] += np.mean(np.array(once)[:, None] >= targets, axis=0) / 4
        direct[1] += np.mean(np.array(best)[:, None] >= targets, axis=0) / 4
    sd = 3 * 0.5 / np.sqrt(2000) / 4  # three images, each a proportion of 2000 runs (the first sum is exact)
    assert np.all(np.abs(fixed - direct[0]) <= 4.5 * sd)
    assert np.all(np.abs(sequential - direct[1]) <= 4.5 * (sd + 3 * 0.5 / np.sqrt(2000) / 4))
    assert fixed[0] == pytest.approx(0.75)  # the three right images always certify r = 0; the wrong one never


@pytest.mark.slow
def test_adaptive_selection_replay_gives_the_cli_rows(bench, toy_checkpoint, tmp_path, capsys) -> None:
    # n0 = 48: the CLI's default adaptive selection draws 16 votes, then the other 32 unless the 16 agree; the
    # replay applies the same rule to the votes `selection` records every 16 samples of the same selection stream
    # (sigma 0.05: the toy model's first 16 votes agree on some images, not on others)
    common = ["--sigma", "0.05", "--seed", "3", "--n0", "48", "--batch", "32"]
    traj, votes = tmp_path / "t.jsonl", tmp_path / "votes.jsonl"
    assert bench.main(["sample", str(toy_checkpoint), "--out", str(traj), "--skip", "3", "--max", "6",
                       "--looks", "64", "512", "--n", "400", "--single", "0.1", *common]) == 0
    assert bench.main(["selection", str(traj), str(toy_checkpoint), "--out", str(votes), "--sigma", "0.05",
                       "--seed", "3", "--batch", "32"]) == 0  # refuses unless the votes at 48 are the recorded ones
    records = bench.load(str(traj), str(votes))
    assert all(sorted(r["selection_votes"]) == [16, 32, 48] for r in records)
    configs = bench.policies(0.05, 0.001, doubling_looks(64, 512), [0.1])
    betting = ["--test", "betting", "--looks", f"4:{configs['betting grid'].schedule.last}", "--radii", "0.1"]
    used = set()
    for name, options in (("grid, adaptive selection", ["--looks", "64:512"]),
                          ("betting radius 0.1, adaptive selection", betting)):
        out = tmp_path / f"{name}.tsv"
        rows = certify_rows(toy_checkpoint, out, 6, [*options, *common])
        for row, record in zip(rows, records, strict=True):
            _, chosen, selection = bench.tested(record, configs[name], "counts")
            result = bench.replay(configs[name], dict(zip(record["sizes"], record["counts"]))).result()
            assert int(row["samples"]) == selection + result.n
            assert int(row["predict"]) == (chosen if result.certified else -1)
            assert float(row["radius"]) == pytest.approx(result.radius, abs=1e-6)
            used.add(selection)
        assert bench.main(["check", str(traj), "--tsv", str(out), "--sigma", "0.05", "--looks", "64", "512",
                           "--single", "0.1", "--policy", name, "--selection", str(votes)]) == 0
        assert f"6 rows of {out} equal the replay" in capsys.readouterr().out
    assert used == {16, 48}  # both branches of the rule happened, and the replay agreed on their cost
