"""The training methods after SmoothAdv through the command line: `smoothadv smooth-prediction` writes the smoothed
prediction that CAT-RS trains from, the training records its settings and resumes.

The objectives themselves (values on tiny models, one epoch of each lowering its loss) are tested in
tests/unit/test_objectives_later_methods.py.
"""

from __future__ import annotations

import hashlib

import torch


def test_smooth_prediction_command_then_catrs_training(toy_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    # `smoothadv smooth-prediction` (a durable evaluation run like certify: sharding and resuming are tested for all of
    # them in test_sharding); CAT-RS then trains from it through the command line (the loop passes each example's
    # index) and records its settings in the checkpoint.
    from smoothadv.cli import main
    from smoothadv.evaluate import read_smooth_prediction
    from smoothadv.models import read_checkpoint

    monkeypatch.setattr("smoothadv.files.git_revision", lambda: None)  # slow git calls, not tested here
    flags = ["--sigma", "0.25", "--n", "40", "--batch", "64", "--max", "24", "--no-progress", "--device", "cpu"]
    whole = tmp_path / "pi.tsv"
    assert main(["smooth-prediction", str(toy_checkpoint), "--out", str(whole), *flags]) == 0
    assert len(whole.read_text().splitlines()) == 25
    pi = read_smooth_prediction(whole)
    assert pi.shape == (512, 4) and torch.allclose(pi.sum(1), torch.ones(512))
    assert torch.equal(pi[24:], torch.full((488, 4), 0.25))  # not computed: uniform, as the original
    counts = [int(v) for v in whole.read_text().splitlines()[1].split("\t")[4].split(",")]
    assert sum(counts) == 40 and torch.allclose(pi[0], torch.tensor(counts) / 40)

    out = tmp_path / "run"
    assert main(["train", "--objective", "catrs", "--smoothed-prediction", str(whole), "--dataset", "synthetic",
                 "--arch", "toy_cnn", "--epochs", "1", "--train-subset", "32", "--eval-subset", "8", "--batch", "16",
                 "--m", "2", "--steps", "1", "--eps", "0.5", "--lbd", "0.5", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    described = read_checkpoint(out / "checkpoint.pth.tar")["objective"]
    digest = hashlib.sha256(pi.to(torch.float32).numpy().tobytes()).hexdigest()
    assert described == {"name": "CATRS", "sigma": 0.25, "smoothed_prediction": str(whole), "m": 2, "eps": 0.5,
                         "steps": 1, "lbd": 0.5, "confidence_mask": False, "pi_sha256": digest}
    resume = ["train", "--objective", "catrs", "--smoothed-prediction", str(whole), "--dataset", "synthetic",
              "--arch", "toy_cnn", "--epochs", "2", "--train-subset", "32", "--eval-subset", "8", "--batch", "16",
              "--m", "2", "--steps", "1", "--eps", "0.5", "--lbd", "0.5", "--out", str(out), "--no-progress",
              "--device", "cpu", "--resume"]
    # the table at the same path changed since the run read it (other targets): resuming is refused, nothing written
    table = whole.read_text()
    lines = table.splitlines()
    fields = lines[1].split("\t")
    fields[4] = ",".join(["40"] + ["0"] * (len(fields[4].split(",")) - 1))
    whole.write_text("\n".join([lines[0], "\t".join(fields), *lines[2:]]) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(resume) == 2
    assert "pi_sha256" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    whole.write_text(table)
    # a run recorded before the digest was: resumed (unverified), as it always was
    saved = read_checkpoint(out / "checkpoint.pth.tar")
    del saved["objective"]["pi_sha256"]
    torch.save(saved, out / "checkpoint.pth.tar")
    # a resumed run reads the same table and continues
    assert main(resume) == 0
    assert read_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 2
