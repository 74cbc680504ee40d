"""Provenance is enforced, not only recorded: every digest an evaluation records is compared where rows of two
runs would meet (a resume, a merge of shards, one `report` NAME over several files), by content and whatever
the path; a digest one record lacks is unverified (said, listed in the sidecar), never refused; and what a
sidecar records of the rows already written is never lost on resume.

Each test triggers the case the way a user does (the command line, in-process) and asserts the exit status,
one `smoothadv: error:` line naming what differs (or the note), and the files before and after. Its docstring
says which wrong result the check prevents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_command as run
from conftest import save_tiny_ddpm

from smoothadv.denoise import DnCNN, save_denoiser
from smoothadv.models import build_model, normalization_spec, save_checkpoint

CERTIFY = ["--sigma", "0.25", "--n0", "5", "--n", "20", "--batch", "20", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Provenance's git calls are slow and tested elsewhere."""
    monkeypatch.setattr("smoothadv.files.git_revision", lambda: None)


def classifier(path: Path, seed: int) -> Path:
    """A toy_cnn checkpoint for the synthetic data, with the weights of `seed` (another seed: another model)."""
    torch.manual_seed(seed)
    save_checkpoint(path, build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.25)
    return path


def denoiser(path: Path, seed: int) -> Path:
    """A small DnCNN for sigma 0.25 with the weights of `seed`, perturbed so that it is not the identity."""
    torch.manual_seed(seed)
    net = DnCNN(3, depth=3, width=4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_denoiser(path, net, arch="dncnn_small", dataset="synthetic", sigma=0.25, epoch=0)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the model files (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".pth.tar")}


def refused(argv: list, capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    code, err = run(argv, capsys)
    assert code == 2, err
    for part in parts:
        assert part in err, err
    return err


def recorded(out: Path) -> dict:
    return json.loads(Path(f"{out}.args.json").read_text())


# ------------------------------------------------------------------ resume


def test_resume_refuses_a_checkpoint_whose_weights_changed_at_the_same_path(tmp_path, capsys) -> None:
    """Prevents an output whose first rows are of one model and whose last rows are of another: the checkpoint
    was retrained (or replaced) at the same path between the run and its resume. The path is not compared (it
    may move), so only the recorded checkpoint_sha256 tells them apart. A copy of the right file at another
    path resumes."""
    ckpt, out = classifier(tmp_path / "model.pth.tar", 0), tmp_path / "c.tsv"
    assert run(["certify", ckpt, "--max", "2", *CERTIFY, "--out", out], capsys)[0] == 0
    original = ckpt.read_bytes()
    classifier(ckpt, 1)  # retrained in place
    before = snapshot(tmp_path)
    err = refused(["certify", ckpt, "--max", "3", *CERTIFY, "--out", out, "--resume"], capsys,
                  "cannot resume", "checkpoint_sha256", "another checkpoint, or the file at that path changed",
                  "resume with the files they were computed with")
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    copy = tmp_path / "elsewhere" / "copy.pth.tar"
    copy.parent.mkdir()
    copy.write_bytes(original)
    assert run(["certify", copy, "--max", "3", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0
    assert out.read_text().count("\n") == 4


def test_resume_refuses_a_denoiser_whose_weights_changed_at_the_same_path(toy_checkpoint, tmp_path, capsys) -> None:
    """Prevents rows of f o D and of f o D' in one output: the denoiser checkpoint was retrained at the same path
    (`--denoiser` is a path, free to move; its denoiser_sha256 is what identifies it)."""
    den, out = denoiser(tmp_path / "den.pth.tar", 0), tmp_path / "c.tsv"
    flags = ["certify", toy_checkpoint, "--denoiser", den, *CERTIFY, "--out", out]
    assert run([*flags, "--max", "2"], capsys)[0] == 0
    denoiser(den, 1)
    before = snapshot(tmp_path)
    refused([*flags, "--max", "3", "--resume"], capsys, "cannot resume", "denoiser_sha256",
            "another --denoiser, or none")
    assert snapshot(tmp_path) == before


def test_resume_with_a_denoiser_of_a_run_without_one_is_refused_not_unverified(toy_checkpoint, tmp_path,
                                                                                capsys) -> None:
    """Prevents rows of f and of f o D in one output: a record of a run without a denoiser holds no denoiser
    digest, and that absence is a fact (no denoiser), not a digest too old to be recorded."""
    den, out = denoiser(tmp_path / "den.pth.tar", 0), tmp_path / "c.tsv"
    assert run(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", out], capsys)[0] == 0
    before = snapshot(tmp_path)
    refused(["certify", toy_checkpoint, "--denoiser", den, "--max", "3", *CERTIFY, "--out", out, "--resume"],
            capsys, "cannot resume", "denoiser_sha256: none != ")
    assert snapshot(tmp_path) == before


def test_a_sidecar_without_the_checkpoint_digest_resumes_unverified(tmp_path, capsys) -> None:
    """Prevents refusing outputs whose sidecar predates a digest (or was written by another tool) while never
    hiding it: the resume goes on, says on stderr that the rows already written are unverified, lists the digest
    under `unverified` (kept by every later resume), and from then on the digest is recorded and enforced."""
    ckpt, out = classifier(tmp_path / "model.pth.tar", 0), tmp_path / "c.tsv"
    assert run(["certify", ckpt, "--max", "2", *CERTIFY, "--out", out], capsys)[0] == 0
    old = recorded(out)
    del old["checkpoint_sha256"]
    Path(f"{out}.args.json").write_text(json.dumps(old))
    code, err = run(["certify", ckpt, "--max", "3", *CERTIFY, "--out", out, "--resume"], capsys)
    assert code == 0 and "records no checkpoint_sha256" in err and "unverified" in err, err
    now = recorded(out)
    assert now["unverified"] == ["checkpoint_sha256"] and len(now["checkpoint_sha256"]) == 64
    assert run(["certify", ckpt, "--max", "4", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0
    assert recorded(out)["unverified"] == ["checkpoint_sha256"]  # still unverified: those rows were not checked
    classifier(ckpt, 1)
    refused(["certify", ckpt, "--max", "5", *CERTIFY, "--out", out, "--resume"], capsys, "checkpoint_sha256")


def test_a_plain_resume_keeps_the_accepted_changes_and_the_shards_merged_from(toy_checkpoint, tmp_path,
                                                                               capsys) -> None:
    """Prevents losing what the sidecar says of the rows already written: a resume after an accepted change
    (a larger --max) used to rewrite OUT.args.json without `resumed_changes` when it changed nothing itself, and
    a resumed merged output lost `merged_from`."""
    out = tmp_path / "c.tsv"
    assert run(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", out], capsys)[0] == 0
    assert run(["certify", toy_checkpoint, "--max", "3", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")  # killed before its last row
    assert run(["certify", toy_checkpoint, "--max", "3", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0
    assert recorded(out)["resumed_changes"] == ["max: 2 -> 3"]
    merged = tmp_path / "m.tsv"
    for i in range(2):
        assert run(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", merged, "--shard", f"{i}/2"],
                   capsys)[0] == 0
    assert run(["merge", merged], capsys)[0] == 0
    shards = recorded(merged)["merged_from"]
    assert run(["certify", toy_checkpoint, "--max", "3", *CERTIFY, "--out", merged, "--resume"], capsys)[0] == 0
    assert recorded(merged)["merged_from"] == shards and recorded(merged)["resumed_changes"] == ["max: 2 -> 3"]


def test_a_resume_keeps_the_environment_the_first_rows_were_computed_in(toy_checkpoint, tmp_path, capsys,
                                                                         monkeypatch) -> None:
    """Prevents attributing rows to an environment they were not computed in: a resume under another torch (or
    git revision) used to replace OUT.env.json; the earlier environment is kept under `earlier`."""
    out = tmp_path / "c.tsv"
    assert run(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", out], capsys)[0] == 0
    first = json.loads(Path(f"{out}.env.json").read_text())
    real = __import__("smoothadv.files", fromlist=["environment"]).environment
    monkeypatch.setattr("smoothadv.files.environment", lambda: {**real(), "torch": "9.9.9"})
    assert run(["certify", toy_checkpoint, "--max", "3", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0
    env = json.loads(Path(f"{out}.env.json").read_text())
    assert env["torch"] == "9.9.9" and env["earlier"] == [first]


# ------------------------------------------------------------------ merge and report


@pytest.fixture
def two_models(tmp_path, capsys) -> Path:
    """Shards 0/2 and 1/2 of one output, computed with two models at the same checkpoint path (retrained in
    between); returns the output."""
    ckpt, out = tmp_path / "model.pth.tar", tmp_path / "s.tsv"
    for i in range(2):
        classifier(ckpt, i)
        assert run(["certify", ckpt, "--max", "4", *CERTIFY, "--out", out, "--shard", f"{i}/2"], capsys)[0] == 0
    return out


def test_merge_refuses_shards_of_two_models(two_models, tmp_path, capsys) -> None:
    """Prevents one merged output holding rows of two models: shard 1 was computed after the checkpoint was
    retrained at the same path, so every setting agrees but checkpoint_sha256."""
    before = snapshot(tmp_path)
    err = refused(["merge", two_models], capsys, "different settings", "checkpoint_sha256",
                  "another checkpoint", "rerun the odd shard with the files the others were computed with")
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not two_models.exists()


def test_report_refuses_one_name_over_files_of_two_models(two_models, tmp_path, capsys) -> None:
    """Prevents a table row (one NAME) whose certified accuracy mixes two models: `report` merges the files
    given under one NAME as shards of one run, so their checkpoints' digests must agree."""
    before = snapshot(tmp_path)
    refused(["report", f"A={two_models}.shard-0-of-2", f"A={two_models}.shard-1-of-2"], capsys,
            "A: ", "different settings", "checkpoint_sha256", "give them different names")
    assert snapshot(tmp_path) == before
    assert run(["report", f"A={two_models}.shard-0-of-2", f"B={two_models}.shard-1-of-2"], capsys)[0] == 0


def test_merge_of_a_shard_without_the_digest_is_unverified_not_refused(toy_checkpoint, tmp_path, capsys) -> None:
    """Prevents both refusing a shard whose sidecar predates a digest and claiming the digest for all merged
    rows: the merge goes on, the merged sidecar drops the digest (not every row was computed under it) and lists
    it under `unverified`."""
    out = tmp_path / "s.tsv"
    for i in range(2):
        assert run(["certify", toy_checkpoint, "--max", "4", *CERTIFY, "--out", out, "--shard", f"{i}/2"],
                   capsys)[0] == 0
    sidecar = Path(f"{out}.shard-1-of-2.args.json")
    old = json.loads(sidecar.read_text())
    del old["checkpoint_sha256"]
    sidecar.write_text(json.dumps(old))
    assert run(["merge", out], capsys)[0] == 0
    merged = recorded(out)
    assert "checkpoint_sha256" not in merged and merged["unverified"] == ["checkpoint_sha256"]


# ------------------------------------------------------------------ what is recorded is what was used


def test_a_checkpoint_replaced_while_it_is_read_is_refused(tmp_path, capsys, monkeypatch) -> None:
    """Prevents recording the digest of weights the rows were not computed with: a training run replaced the
    checkpoint between loading it and hashing it, so the sidecar would name the new file for the old model's
    rows (and a resume with the new file would then pass)."""
    from smoothadv import run as run_module

    ckpt, out = classifier(tmp_path / "model.pth.tar", 0), tmp_path / "c.tsv"
    real = run_module.load_checkpoint

    def load_then_replaced(*args, **kwargs):
        loaded = real(*args, **kwargs)
        classifier(ckpt, 1)  # the training run's next epoch lands now
        return loaded

    monkeypatch.setattr(run_module, "load_checkpoint", load_then_replaced)
    refused(["certify", ckpt, "--max", "2", *CERTIFY, "--out", out], capsys,
            f"the checkpoint {ckpt} changed while it was being read", "a copy of it")
    assert not out.exists() and not Path(f"{out}.args.json").exists()


def test_a_denoiser_replaced_while_it_is_read_is_refused(toy_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    """Prevents recording a denoiser_sha256 that is not of the denoiser the rows were computed with (the file
    was replaced between loading and hashing it)."""
    from smoothadv import models

    den, out = denoiser(tmp_path / "den.pth.tar", 0), tmp_path / "c.tsv"
    real = models.load_denoiser

    def load_then_replaced(*args, **kwargs):
        loaded = real(*args, **kwargs)
        denoiser(den, 1)
        return loaded

    monkeypatch.setattr(models, "load_denoiser", load_then_replaced)
    refused(["certify", toy_checkpoint, "--denoiser", den, "--max", "2", *CERTIFY, "--out", out], capsys,
            f"--denoiser {den} changed while it was being read")
    assert not out.exists()


# ------------------------------------------------------------------ a diffusion model's digests


@pytest.mark.parametrize("part, name", [("unet", "denoiser_weights_sha256"), ("scheduler", "denoiser_schedule_sha256")])
def test_resume_refuses_a_diffusion_model_changed_in_place(toy_checkpoint, tmp_path, capsys, part, name) -> None:
    """Prevents rows of two diffusion denoisers in one output: the model directory's weights (or its noise
    schedule, which moves t*) were replaced in place; the refusal names the digest of the part that changed."""
    pytest.importorskip("diffusers")
    model, out = save_tiny_ddpm(tmp_path / "ddpm", 0), tmp_path / "c.tsv"
    flags = ["predict", toy_checkpoint, "--denoiser", model, "--sigma", "0.25", "--n", "20", "--batch", "20",
             "--no-progress", "--device", "cpu", "--out", out]
    assert run([*flags, "--max", "1"], capsys)[0] == 0
    other = save_tiny_ddpm(tmp_path / "other", 1, beta_end=0.02 if part == "unet" else 0.03)
    shutil.rmtree(model / part)
    shutil.copytree(other / part, model / part)
    before = snapshot(tmp_path)
    refused([*flags, "--max", "2", "--resume"], capsys, "cannot resume", name, "denoiser_sha256")
    assert snapshot(tmp_path) == before
