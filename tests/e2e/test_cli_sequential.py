"""`smoothadv certify --mode sequential` through the command line: the rows and their provenance, the flags and
their one-line refusals, adaptive class selection and the betting test across resume, shards and merge, and files
written before the `samples` column had its name.

The counts-level logic of these tests lives in tests/unit/test_sequential.py, test_sequential_selection.py and
test_betting.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from smoothadv.cli import main
from smoothadv.models import build_model, normalization_spec, save_checkpoint
from smoothadv.sequential import SEQUENTIAL_COLUMNS, SequentialConfig, doubling_looks, fitted_schedule

# ------------------------------------------------------------------ the group-sequential test (spending)


def _checkpoint(tmp_path) -> str:
    torch.manual_seed(1)
    model = build_model("toy_cnn", "synthetic")
    path = tmp_path / "toy.pth.tar"
    save_checkpoint(path, model, arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic", "normalize"), sigma=0.25)
    return str(path)


def test_cli_sequential_mode_records_samples_and_mode(tmp_path, capsys) -> None:
    import json

    ckpt = _checkpoint(tmp_path)
    common = ["--sigma", "0.25", "--max", "5", "--no-progress", "--batch", "512", "--device", "cpu"]
    out = tmp_path / "seq.tsv"
    assert main(["certify", ckpt, "--out", str(out), "--mode", "sequential", "--class-from", "label",
                 "--looks", "128:1024", "--radii", "0.25", *common]) == 0
    lines = out.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == SEQUENTIAL_COLUMNS
    for line in lines[1:]:
        idx, label, predict, radius, correct, _, n, mode = line.split("\t")
        assert mode == "sequential/label" and int(n) in (128, 256, 512, 1024)
        assert int(correct) == int(int(predict) == int(label)) and int(predict) in (int(label), -1)
        assert float(radius) <= SequentialConfig(0.25, looks=doubling_looks(128, 1024)).max_radius
    # provenance: the grid's schedule fitted on the given doublings, and the alpha spent at each look
    recorded = json.loads((tmp_path / "seq.tsv.args.json").read_text())
    looks, levels = fitted_schedule(0.25, 0.001, (0.25,), doubling_looks(128, 1024))
    assert tuple(recorded["looks"]) == looks and recorded["levels"] == pytest.approx(levels)
    assert sum(recorded["levels"]) == pytest.approx(0.001) and recorded["policy"] == "grid"
    sel = tmp_path / "sel.tsv"
    assert main(["certify", ckpt, "--out", str(sel), "--mode", "sequential", "--n0", "64", "--looks", "128:1024",
                 *common]) == 0
    rows = [line.split("\t") for line in sel.read_text().splitlines()[1:]]
    assert all(r[7] == "sequential/selection" and (int(r[6]) - 64) in (128, 256, 512, 1024) for r in rows)
    fixed = tmp_path / "fixed.tsv"
    assert main(["certify", ckpt, "--out", str(fixed), "--n0", "16", "--n", "100", *common]) == 0
    assert fixed.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    capsys.readouterr()


@pytest.mark.parametrize("flags,message", [
    (["--class-from", "label"], "need --mode sequential"),
    (["--mode", "sequential", "--policy", "tolerance"], "needs --tolerance"),
    (["--mode", "sequential", "--policy", "full", "--radii", "0.5"], "grid policy"),
    (["--mode", "sequential", "--looks", "1000"], "FIRST:LAST"),
])
def test_cli_rejects_inconsistent_sequential_flags(tmp_path, capsys, flags, message) -> None:
    code = main(["certify", _checkpoint(tmp_path), "--sigma", "0.25", "--out", str(tmp_path / "o.tsv"), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_forecast_level_default_strict_and_bad(tmp_path, capsys) -> None:
    import json

    ckpt = _checkpoint(tmp_path)
    common = ["--sigma", "0.25", "--max", "3", "--no-progress", "--batch", "256", "--device", "cpu", "--mode",
              "sequential", "--class-from", "label", "--looks", "128:1024", "--radii", "0.25"]
    for flag, recorded in (([], 0.05), (["--forecast-alpha", "strict"], "strict"), (["--forecast-alpha", "0.2"], 0.2)):
        out = tmp_path / f"seq{len(flag)}{recorded}.tsv"
        assert main(["certify", ckpt, "--out", str(out), *common, *flag]) == 0
        assert json.loads((tmp_path / f"{out.name}.args.json").read_text())["forecast_alpha"] == recorded
    assert main(["certify", ckpt, "--out", str(tmp_path / "bad.tsv"), *common, "--forecast-alpha", "loose"]) == 2
    assert "forecast-alpha" in capsys.readouterr().err


# ------------------------------------------------------------------ adaptive class selection


def test_cli_selection_flag_is_recorded_and_refused_in_fixed_mode(toy_checkpoint, tmp_path) -> None:
    common = ["--sigma", "0.25", "--max", "3", "--no-progress", "--device", "cpu", "--looks", "64:512"]
    rows = {}
    for selection in ("adaptive", "fixed"):
        out = tmp_path / f"{selection}.tsv"
        assert main(["certify", str(toy_checkpoint), "--out", str(out), "--mode", "sequential", "--selection",
                     selection, *common]) == 0
        assert json.loads((tmp_path / f"{selection}.tsv.args.json").read_text())["selection"] == selection
        rows[selection] = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    for a, f in zip(rows["adaptive"], rows["fixed"], strict=True):
        assert int(a[6]) in (int(f[6]), int(f[6]) - 84)  # the n column counts the selection samples used
    default = tmp_path / "default.tsv"
    assert main(["certify", str(toy_checkpoint), "--out", str(default), "--mode", "sequential", *common]) == 0
    assert json.loads((tmp_path / "default.tsv.args.json").read_text())["selection"] == "adaptive"
    assert main(["certify", str(toy_checkpoint), "--out", str(tmp_path / "x.tsv"), "--selection", "adaptive",
                 "--sigma", "0.25", "--max", "1", "--n", "100", "--no-progress"]) == 2
    # a sequential run recorded before adaptive selection (no `selection`) resumes as Cohen's rule
    old = tmp_path / "fixed.tsv.args.json"
    record = json.loads(old.read_text())
    del record["selection"]
    old.write_text(json.dumps(record))
    resume = ["certify", str(toy_checkpoint), "--out", str(tmp_path / "fixed.tsv"), "--mode", "sequential", "--resume",
              *common]
    assert main([*resume, "--selection", "fixed"]) == 0
    assert main(resume) == 2  # the default (adaptive) would write other rows


def test_adaptive_rows_do_not_depend_on_sharding_or_grouping(toy_checkpoint, tmp_path) -> None:
    # each image's selection votes come from its own stream, drawn 16 then n0 - 16: the rows of two shards merged
    # are those of one run (sigma 0.05: some images stop after 16 selection votes, others take all 48)
    flags = [str(toy_checkpoint), "--mode", "sequential", "--sigma", "0.05", "--n0", "48", "--looks", "64:512",
             "--max", "6", "--skip", "3", "--seed", "3", "--no-progress", "--device", "cpu"]
    single, sharded = tmp_path / "one.tsv", tmp_path / "sharded.tsv"
    assert main(["certify", *flags, "--out", str(single)]) == 0
    for i in (1, 0):
        assert main(["certify", *flags, "--out", str(sharded), "--shard", f"{i}/2", "--batch", "7"]) == 0
    assert main(["merge", str(sharded)]) == 0

    def rows(path):
        return [line.split("\t")[:5] + line.split("\t")[6:] for line in path.read_text().splitlines()]  # not time

    assert rows(sharded) == rows(single)
    assert {int(r[5]) - int(r[5]) // 64 * 64 for r in rows(single)[1:]} == {16, 48}  # n = selection + 64 k


# ------------------------------------------------------------------ the betting test


def test_cli_betting_rows_resume_and_shards(toy_checkpoint, tmp_path) -> None:
    common = ["--sigma", "0.25", "--mode", "sequential", "--test", "betting", "--looks", "16:1024", "--max", "4",
              "--batch", "128", "--seed", "2", "--no-progress", "--device", "cpu", "--class-from", "label"]
    out = tmp_path / "b.tsv"
    assert main(["certify", str(toy_checkpoint), "--out", str(out), *common]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["idx", "label", "predict", "radius", "correct", "time", "samples", "mode"]
    assert len(rows) == 5 and all(r[7] == "betting/label" and 16 <= int(r[6]) <= 1024 for r in rows[1:])
    recorded = (tmp_path / "b.tsv.args.json").read_text()
    assert '"test": "betting"' in recorded and '"final_share": 0.5' in recorded
    # resume after losing the last two rows: the same rows again
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-2]) + "\n")
    assert main(["certify", str(toy_checkpoint), "--out", str(out), "--resume", *common]) == 0
    assert [line.split("\t")[:5] + line.split("\t")[6:] for line in out.read_text().splitlines()] == \
        [r[:5] + r[6:] for r in rows]
    # two shards merged: the same rows
    for shard in ("0/2", "1/2"):
        assert main(["certify", str(toy_checkpoint), "--out", str(tmp_path / "s.tsv"), "--shard", shard, *common]) == 0
    assert main(["merge", str(tmp_path / "s.tsv")]) == 0
    merged = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()]
    assert [r[:5] + r[6:] for r in merged] == [r[:5] + r[6:] for r in rows]
    # resuming with the other test is refused
    assert main(["certify", str(toy_checkpoint), "--out", str(out), "--resume", *common[:4], *common[6:]]) == 2


def test_a_sequential_file_with_the_old_n_column_resumes_and_merges_as_it_was(toy_checkpoint, tmp_path) -> None:
    """Files written before the `samples` column had its name call it `n`: resuming one keeps its header and adds
    the same rows; shards all written that way merge with it; the report reads both."""
    from smoothadv.report import load_results

    common = ["--sigma", "0.25", "--mode", "sequential", "--test", "spending", "--looks", "16:256", "--max", "4",
              "--batch", "64", "--seed", "3", "--no-progress", "--device", "cpu"]
    new = tmp_path / "new.tsv"
    assert main(["certify", str(toy_checkpoint), "--out", str(new), *common]) == 0
    rows = new.read_text().splitlines()
    old = tmp_path / "old.tsv"
    legacy = [rows[0].replace("\tsamples\t", "\tn\t"), *rows[1:3]]  # two rows written, the old header
    old.write_text("\n".join(legacy) + "\n")
    sidecar = (tmp_path / "new.tsv.args.json").read_text().replace('"test": "spending"', '"test": null')
    (tmp_path / "old.tsv.args.json").write_text(sidecar)  # as earlier versions recorded the default test
    assert main(["certify", str(toy_checkpoint), "--out", str(old), "--resume", *common]) == 0
    resumed = old.read_text().splitlines()
    assert resumed[0] == legacy[0] and [r.split("\t")[:5] + r.split("\t")[6:] for r in resumed[1:]] == \
        [r.split("\t")[:5] + r.split("\t")[6:] for r in rows[1:]]
    assert load_results(old).radius.tolist() == load_results(new).radius.tolist()
    # the samples column under either name (forward passes per row), and merged shards keep it
    assert load_results(old).samples.tolist() == load_results(new).samples.tolist() == \
        [int(r.split("\t")[6]) for r in rows[1:]]
    for i in range(2):  # shards of the old format merge under the old header
        shard = tmp_path / f"s.tsv.shard-{i}-of-2"
        assert main(["certify", str(toy_checkpoint), "--out", str(tmp_path / "s.tsv"), "--shard", f"{i}/2",
                     *common]) == 0
        shard.write_text(shard.read_text().replace("\tsamples\t", "\tn\t", 1))
    assert main(["merge", str(tmp_path / "s.tsv")]) == 0
    assert (tmp_path / "s.tsv").read_text().splitlines()[0] == legacy[0]
    assert sorted(load_results(tmp_path / "s.tsv").samples.tolist()) == sorted(load_results(new).samples.tolist())
