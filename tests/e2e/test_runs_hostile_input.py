"""Nothing lost, nothing silently wrong, round two: one test per defect a hostile new user reported.

Each test triggers the defect the way a user does (the command line, in-process) and asserts the exit
status, a single `smoothadv: error:` line with no traceback, and the files' contents before and after.
The tests of defects that the restructure (one training loop, one checkpoint format) had already fixed
are kept, so they stay fixed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_command as run

from smoothadv.cli import main
from smoothadv.denoise import DnCNN, save_denoiser

CPU = ["--no-progress", "--device", "cpu"]
CERTIFY = ["--sigma", "0.25", "--n0", "5", "--n", "20", "--batch", "20", *CPU]
TRAIN = ["train", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "32", "--eval-subset", "8",
         "--batch", "16", *CPU]
DENOISER = ["train-denoiser", "--dataset", "synthetic", "--epochs", "1", "--batch", "32", "--train-subset", "64",
            "--eval-subset", "16", "--depth", "3", "--width", "4", *CPU]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> str:
    code, err = run(argv, capsys)
    assert code == 2 and message in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished classifier run and a finished denoiser run trained through it (read-only: copy them)."""
    root = tmp_path_factory.mktemp("runs")
    assert main([*TRAIN, "--out", str(root / "classifier")]) == 0
    assert main([*DENOISER, "--out", str(root / "denoiser")]) == 0
    assert main([*DENOISER, "--objective", "stability", "--classifier", str(root / "classifier/checkpoint.pth.tar"),
                 "--out", str(root / "stability")]) == 0
    return {"classifier": root / "classifier", "denoiser": root / "denoiser", "stability": root / "stability"}


def copy_run(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)
    return to


# ------------------------------------------------------------------ 1. certify --out never replaces an input


def test_certify_never_writes_over_its_checkpoint_or_denoiser(toy_checkpoint, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "model.pth.tar"
    checkpoint.write_bytes(toy_checkpoint.read_bytes())
    denoiser = tmp_path / "d.pth.tar"
    torch.manual_seed(0)
    save_denoiser(denoiser, DnCNN(3, depth=3, width=4), arch="dncnn_small", dataset="synthetic", sigma=0.25)
    before = snapshot(tmp_path)
    for argv in (["--out", checkpoint, "--force"], ["--out", checkpoint, "--resume"], ["--out", checkpoint],
                 ["--out", denoiser, "--denoiser", denoiser, "--force"], ["--out", denoiser, "--denoiser", denoiser]):
        refused(["certify", checkpoint, "--max", "2", *CERTIFY, *argv], capsys, "an input of this command")
        assert snapshot(tmp_path) == before
    # a sidecar is written too: OUT.args.json may not be an input either
    sidecar_named = tmp_path / "x.args.json"
    sidecar_named.write_bytes(toy_checkpoint.read_bytes())
    before = snapshot(tmp_path)
    refused(["certify", sidecar_named, "--max", "2", *CERTIFY, "--out", tmp_path / "x", "--force"], capsys,
            "the settings sidecar")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ 2. merge never writes over its own input


def _two_shards(checkpoint: Path, folder: Path) -> Path:
    out = folder / "c.tsv"
    for i in range(2):
        assert main(["certify", str(checkpoint), "--max", "4", *CERTIFY, "--out", str(out), "--shard", f"{i}/2"]) == 0
    return out


def test_merge_never_writes_over_a_shard_or_its_sidecar(toy_checkpoint, tmp_path, capsys) -> None:
    out = _two_shards(toy_checkpoint, tmp_path)
    shards = [f"{out}.shard-0-of-2", f"{out}.shard-1-of-2"]
    before = snapshot(tmp_path)
    refused(["merge", shards[0], *shards, "--force"], capsys, "an input of this command")
    refused(["merge", shards[1], *shards], capsys, "an input of this command")
    assert snapshot(tmp_path) == before
    assert run(["merge", out, *shards], capsys)[0] == 0
    assert out.read_text().count("\n") == 5


# ------------------------------------------------------------------ 3. pseudo-label never writes over its input


def test_pseudo_label_never_writes_over_its_images_or_checkpoint(toy_checkpoint, tmp_path, capsys) -> None:
    images = tmp_path / "x.npz"
    np.savez(images, images=np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8))
    checkpoint = tmp_path / "model.pth.tar"
    checkpoint.write_bytes(toy_checkpoint.read_bytes())
    before = snapshot(tmp_path)
    for out in (images, checkpoint):
        for force in ([], ["--force"]):
            refused(["pseudo-label", checkpoint, "--images", images, "--out", out, *force, "--device", "cpu"], capsys,
                    "also an input")
            assert snapshot(tmp_path) == before
    assert run(["pseudo-label", checkpoint, "--images", images, "--out", tmp_path / "y.npz", "--device", "cpu"],
               capsys)[0] == 0


# ------------------------------------------------------------------ 5. one run per directory


def test_a_denoiser_and_a_classifier_never_share_a_run_directory(runs, tmp_path, capsys) -> None:
    classifier = copy_run(runs["classifier"], tmp_path / "classifier")
    before = snapshot(classifier)
    for extra in ([], ["--force"], ["--resume"]):
        refused([*DENOISER, "--out", classifier, *extra], capsys, "holds a classifier run")
        assert snapshot(classifier) == before
    denoiser = copy_run(runs["denoiser"], tmp_path / "denoiser")
    before = snapshot(denoiser)
    for extra in ([], ["--force"], ["--resume"]):
        refused([*TRAIN, "--out", denoiser, *extra], capsys, "holds a denoiser run")
        assert snapshot(denoiser) == before


def test_a_run_never_appends_under_another_runs_log_header(runs, tmp_path, capsys) -> None:
    """A classifier run whose log.tsv is a denoiser's (e.g. copied in by hand): resuming it is refused."""
    classifier = copy_run(runs["classifier"], tmp_path / "classifier")
    shutil.copy(runs["denoiser"] / "log.tsv", classifier / "log.tsv")
    before = snapshot(classifier)
    refused([*TRAIN[:4], "2", *TRAIN[5:], "--out", classifier, "--resume"], capsys, "another run's log")
    assert snapshot(classifier) == before
    # a foreign log.tsv in a fresh directory is not replaced without --force
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "log.tsv").write_text("my own notes\n")
    refused([*TRAIN, "--out", fresh], capsys, "is not the log of this kind of run")
    assert (fresh / "log.tsv").read_text() == "my own notes\n"


# ------------------------------------------------------------------ 6, 9, 10. a resumed denoiser run changes nothing


@pytest.mark.parametrize("change, message", [
    (["--optimizer", "sgd"], "--optimizer 'adam' -> 'sgd'"), (["--lr", "0.5"], "--lr 0.001 -> 0.5"),
    (["--batch", "16"], "--batch 32 -> 16"), (["--lr-step", "5"], "--lr-step 30 -> 5"),
    (["--train-subset", "32"], "--train-subset 64 -> 32"),
])
def test_a_resumed_denoiser_refuses_every_changed_setting(runs, tmp_path, capsys, change, message) -> None:
    out = copy_run(runs["denoiser"], tmp_path / "d")
    before = snapshot(out)
    argv = [*DENOISER, "--out", out, "--resume", *change]
    argv[argv.index("--epochs") + 1] = "2"
    refused(argv, capsys, message)
    assert snapshot(out) == before


def test_a_resumed_denoiser_refuses_another_classifier_at_the_same_path(runs, tmp_path, capsys) -> None:
    classifier = copy_run(runs["classifier"], tmp_path / "classifier")
    out = tmp_path / "stability"
    shutil.copytree(runs["stability"], out)
    # the checkpoint records its classifier by path and SHA-256: move the run's record to this copy's path
    payload = torch.load(out / "denoiser.pth.tar", weights_only=True)
    config = payload["config"]
    config["classifier"] = [str(classifier / "checkpoint.pth.tar")]
    payload["classifiers"] = [{**payload["classifiers"][0], "path": str(classifier / "checkpoint.pth.tar")}]
    torch.save(payload, out / "denoiser.pth.tar")
    argv = [*DENOISER, "--objective", "stability", "--classifier", classifier / "checkpoint.pth.tar", "--out", out,
            "--resume"]
    argv[argv.index("--epochs") + 1] = "2"
    assert main([*TRAIN, "--out", str(classifier), "--force", "--seed", "3"]) == 0  # B replaces A at A's path
    capsys.readouterr()
    before = snapshot(out)
    refused(argv, capsys, "trained through other classifiers")
    assert snapshot(out) == before


# ------------------------------------------------------------------ 7. a run never writes over its own input


def test_a_run_never_writes_over_its_init_or_pretrained_file(runs, tmp_path, capsys) -> None:
    denoiser = copy_run(runs["denoiser"], tmp_path / "d")
    before = snapshot(denoiser)
    refused([*DENOISER, "--init", denoiser / "denoiser.pth.tar", "--out", denoiser, "--force"], capsys,
            "an input of this command")
    assert snapshot(denoiser) == before
    classifier = copy_run(runs["classifier"], tmp_path / "c")
    before = snapshot(classifier)
    refused([*TRAIN, "--pretrained", classifier / "checkpoint.pth.tar", "--out", classifier, "--force"], capsys,
            "an input of this command")
    assert snapshot(classifier) == before


# ------------------------------------------------------------------ 8. the demo never replaces the user's files


def test_demo_never_replaces_a_report_table_or_tsv_it_did_not_write(tmp_path, capsys) -> None:
    demo = ["demo", "--dataset", "synthetic", "--epochs", "1", "--certify", "2", "--n", "20", "--attack-count", "0",
            "--device", "cpu", "--no-progress"]
    for name, content in [("report.md", "my report\n"), ("certify_gaussian.tsv", "idx\tlabel\n0\t1\n"),
                          ("table.md", "my table\n"), ("accuracy.png", "my picture")]:
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text(content)
        refused([*demo, "--out", out], capsys, "was not written by the demo")
        assert snapshot(out) == {name: content.encode()}


def test_demo_report_only_keeps_the_attack_rows_of_the_run(tmp_path, capsys) -> None:
    """--report-only --attack-count 0 on a run that attacked is refused (the report would drop its attacks)."""
    out = tmp_path / "demo"
    demo = ["demo", "--dataset", "synthetic", "--epochs", "1", "--certify", "2", "--n", "20", "--attack-count", "1",
            "--steps", "1", "--device", "cpu", "--no-progress", "--out", out]
    assert run(demo, capsys)[0] == 0
    before = snapshot(out)
    demo[demo.index("--attack-count") + 1] = "0"
    refused([*demo, "--report-only"], capsys, "--attack-count 0 would drop those rows")
    assert snapshot(out) == before


# ------------------------------------------------------------------ 11, 19. numbers no network can train with


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e300"], "--lr 1e+300 is beyond"), (["--weight-decay", "1e300"], "--weight-decay 1e+300 is beyond"),
    (["--sigma", "1e300"], "training diverged"), (["--sigma", "1e30"], "training diverged"),
    (["--lr", "1e6", "--optimizer", "sgd"], "training diverged"),
    (["--lr-gamma", "1e30", "--lr-step", "1", "--epochs", "3"], "--lr-gamma"),
])
def test_a_denoiser_run_that_cannot_train_is_one_line_and_leaves_nothing(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "run"
    refused([*DENOISER, "--out", out, *flags], capsys, message)
    assert not out.exists()


def test_a_diverged_resumption_keeps_the_run_as_it_was(runs, tmp_path, capsys) -> None:
    """A failed resumption (here: refused settings) leaves args.json, log.tsv and the checkpoint untouched."""
    out = copy_run(runs["denoiser"], tmp_path / "d")
    before = snapshot(out)
    refused([*DENOISER, "--out", out, "--resume", "--sigma", "0.5"], capsys, "--sigma 0.25 -> 0.5")
    assert snapshot(out) == before


# ------------------------------------------------------------------ 12, 13. a denoiser is checked before it is used


def test_a_denoiser_with_flipped_weight_bytes_or_of_another_dataset_is_refused(toy_checkpoint, runs, tmp_path,
                                                                               capsys) -> None:
    flipped = tmp_path / "flipped.pth.tar"
    payload = torch.load(runs["denoiser"] / "denoiser.pth.tar", weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first].view(-1)[0] += 1.0
    torch.save(payload, flipped)
    out = tmp_path / "c.tsv"
    refused(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", out, "--denoiser", flipped], capsys,
            "its weights do not match the digest")
    other = tmp_path / "cifar.pth.tar"
    torch.manual_seed(0)
    save_denoiser(other, DnCNN(3, depth=3, width=4), arch="dncnn_small", dataset="cifar10", sigma=0.25)
    refused(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", out, "--denoiser", other], capsys,
            "was trained on cifar10, but the classifier is for synthetic")
    assert not out.exists()
    refused([*DENOISER, "--init", other, "--out", tmp_path / "run"], capsys, "was trained on cifar10")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 14. data identified by content, not path


def test_a_resumed_certify_refuses_other_data_of_the_same_size(toy_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    from smoothadv import run as run_module

    out = tmp_path / "c.tsv"
    assert run(["certify", toy_checkpoint, "--max", "2", *CERTIFY, "--out", out], capsys)[0] == 0
    recorded = json.loads((tmp_path / "c.tsv.args.json").read_text())
    count, digest = recorded["data_sha256"].split(":")
    assert count == "2" and len(digest) == 64  # the selection's size and its examples' SHA-256
    real = run_module.get_dataset

    def flipped(name, split, data_dir=None, **kwargs):  # another test set of the same size (the user's --data-dir B)
        dataset = real(name, split, None, **kwargs)
        if data_dir is None:
            return dataset
        return torch.utils.data.Subset(dataset, list(reversed(range(len(dataset)))))

    monkeypatch.setattr(run_module, "get_dataset", flipped)
    monkeypatch.setattr(run_module, "check_data_dir", lambda path: None)
    before = snapshot(tmp_path)
    for more in (["--max", "2"], ["--max", "4"]):
        refused(["certify", toy_checkpoint, *more, *CERTIFY, "--out", out, "--resume", "--data-dir", tmp_path / "B"],
                capsys, "the selected examples differ")
        assert snapshot(tmp_path) == before
    # the same data under another path resume (a larger --max is an accepted change)
    assert run(["certify", toy_checkpoint, "--max", "4", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0
    assert out.read_text().count("\n") == 5
    # a sidecar written before the digest existed still resumes
    old = json.loads((tmp_path / "c.tsv.args.json").read_text())
    del old["data_sha256"]
    (tmp_path / "c.tsv.args.json").write_text(json.dumps(old))
    assert run(["certify", toy_checkpoint, "--max", "4", *CERTIFY, "--out", out, "--resume"], capsys)[0] == 0


# ------------------------------------------------------------------ 18. radii that collide at the stored precision


def test_attack_radii_equal_at_the_stored_precision_are_refused(toy_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "a.tsv"
    for eps, message in ((["0.1", "0.1000001"], "the same radius 0.1 at the precision"),
                         (["0.25", "0.25"], "a radius twice")):
        refused(["attack", toy_checkpoint, "--eps", *eps, "--steps", "1", "--m", "1", "--max", "2", "--sigma", "0.25",
                 "--n", "20", "--batch", "20", *CPU, "--out", out], capsys, message)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 23. a sidecar claiming a huge dataset


def test_merge_of_shards_whose_sidecar_claims_a_huge_dataset_is_one_line(toy_checkpoint, tmp_path, capsys) -> None:
    out = _two_shards(toy_checkpoint, tmp_path)
    for i in range(2):
        sidecar = Path(f"{out}.shard-{i}-of-2.args.json")
        recorded = json.loads(sidecar.read_text())
        recorded.update(dataset_size=10 ** 12, max=None)
        sidecar.write_text(json.dumps(recorded))
    before = snapshot(tmp_path)
    refused(["merge", out], capsys, "is incomplete")
    assert snapshot(tmp_path) == before
    for i in range(2):  # with --max the selection is sliced before it is listed
        sidecar = Path(f"{out}.shard-{i}-of-2.args.json")
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "max": 4}))
    assert run(["merge", out], capsys)[0] == 0


# ------------------------------------------------------------------ 28. convert-checkpoint keeps what a file says


def test_convert_checkpoint_of_a_smoothadv_file_still_loads(toy_checkpoint, tmp_path, capsys) -> None:
    from smoothadv.models import load_checkpoint

    old = torch.load(toy_checkpoint, weights_only=True)
    del old["weights_sha256"]  # a file written before digests
    legacy = tmp_path / "old.pth.tar"
    torch.save(old, legacy)
    before = legacy.read_bytes()
    assert run(["convert-checkpoint", legacy, tmp_path / "new.pth.tar", "--trust"], capsys)[0] == 0
    assert legacy.read_bytes() == before
    model, meta = load_checkpoint(tmp_path / "new.pth.tar")
    reference, expected = load_checkpoint(toy_checkpoint)
    assert meta["weights_verified"] is True
    for key in ("format", "dataset", "normalization", "num_classes", "sigma", "arch"):
        assert meta[key] == expected[key], key
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(model(x), reference(x))


# ------------------------------------------------------------------ 29. a default spelled out equals it left out


def _sequential(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["certify", str(checkpoint), "--mode", "sequential", "--looks", "16:64", "--sigma", "0.25", "--batch", "64",
            *CPU, "--out", str(out), *extra]


def test_resume_and_merge_treat_the_default_test_spelled_out_as_left_out(toy_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "s.tsv"
    assert run([*_sequential(toy_checkpoint, out, "--max", "2")], capsys)[0] == 0
    assert run([*_sequential(toy_checkpoint, out, "--max", "3", "--resume", "--test", "spending")], capsys)[0] == 0
    # a sidecar written the old way (test: null) resumes with the test spelled out, and without it
    sidecar = tmp_path / "s.tsv.args.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "test": None}))
    assert run([*_sequential(toy_checkpoint, out, "--max", "4", "--resume", "--test", "spending")], capsys)[0] == 0
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "test": None}))
    assert run([*_sequential(toy_checkpoint, out, "--max", "4", "--resume")], capsys)[0] == 0
    # shards: one spelled out, one left out, one recorded the old way
    merged = tmp_path / "m.tsv"
    assert run([*_sequential(toy_checkpoint, merged, "--max", "4", "--shard", "0/2", "--test", "spending")],
               capsys)[0] == 0
    assert run([*_sequential(toy_checkpoint, merged, "--max", "4", "--shard", "1/2")], capsys)[0] == 0
    shard = Path(f"{merged}.shard-1-of-2.args.json")
    shard.write_text(json.dumps({**json.loads(shard.read_text()), "test": None}))
    assert run(["merge", merged], capsys)[0] == 0
    assert merged.read_text().count("\n") == 5


# ------------------------------------------------------------------ 30. rows do not depend on --batch, any shape


class _Threshold(torch.nn.Module):
    """Class 1 when the mean pixel exceeds 0.5 (votes vary under noise for an input near 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.flatten(1).mean(1)
        return torch.stack([0.5 - mean, mean - 0.5], dim=1)


@pytest.mark.parametrize("shape", [(1, 3, 3), (3, 5, 7), (1, 1, 1), (2, 3, 3), (1, 4, 4)])
def test_certificates_do_not_depend_on_the_batch_size_for_any_shape(shape) -> None:
    from smoothadv import Smooth
    from smoothadv.betting import BettingConfig
    from smoothadv.sequential import SequentialConfig, certify_sequential

    smooth = Smooth(_Threshold(), 2, 0.25)
    x = torch.full(shape, 0.52)
    results = []
    for batch in (1000, 999, 64, 17):
        fixed = smooth.certify(x, 20, 3000, 0.001, batch, generator=torch.Generator().manual_seed(3))
        spending = certify_sequential(smooth, x, SequentialConfig(0.25, 0.001, base=(64, 128, 256, 512, 1024, 2048)),
                                      batch_size=batch, generator=torch.Generator().manual_seed(3))
        betting = certify_sequential(smooth, x, BettingConfig(0.25, 0.001, first=64, last=4096),
                                     batch_size=batch, generator=torch.Generator().manual_seed(3))
        results.append([(c.prediction, c.radius, c.count) for c in (fixed, spending)] +
                       [(betting.prediction, betting.radius, betting.samples)])
    assert all(result == results[0] for result in results[1:]), results


def test_packed_and_plain_samplers_agree_on_an_odd_shape() -> None:
    from smoothadv.smoothing import NoisySampler, PackedSampler, SampleRequest

    sampler = NoisySampler(_Threshold(), 2, 0.25)
    x, y = torch.full((1, 3, 3), 0.5), torch.full((1, 3, 3), 0.48)
    plain = sampler.segment_counts(x, (7, 501), 1000, torch.Generator().manual_seed(5))
    for batch in (13, 100, 999):
        packed = PackedSampler(sampler).counts([SampleRequest(y, (50,), torch.Generator().manual_seed(6)),
                                                SampleRequest(x, (7, 501), torch.Generator().manual_seed(5))], batch)
        assert torch.equal(packed[1:], plain)


def test_the_canonical_chunks_of_other_devices_do_not_depend_on_the_batch_size(monkeypatch) -> None:
    """The path of devices whose Gaussian values depend on each draw's size (CUDA), exercised on the CPU: the
    stream is drawn in chunks fixed by the shape alone, so any batch size serves the same values."""
    from smoothadv import smoothing
    from smoothadv.smoothing import NoisySampler

    made = smoothing.NoiseStream.__init__

    def chunked(self, *args, **kwargs) -> None:
        made(self, *args, **kwargs)
        self.cpu, self.chunk = False, 7

    monkeypatch.setattr(smoothing.NoiseStream, "__init__", chunked)
    sampler = NoisySampler(_Threshold(), 2, 0.25)
    for shape in ((1, 3, 3), (1, 4, 4)):
        x = torch.full(shape, 0.5)
        counts = [sampler.segment_counts(x, (5, 300), batch, torch.Generator().manual_seed(2)) for batch in (1, 6, 7,
                                                                                                             64, 999)]
        assert all(torch.equal(c, counts[0]) for c in counts[1:])


# ------------------------------------------------------------------ 26. an alpha whose shares underflow


@pytest.mark.parametrize("test", ["spending", "betting"])
def test_a_sequential_alpha_whose_share_underflows_is_one_line_naming_alpha(toy_checkpoint, tmp_path, capsys,
                                                                            test) -> None:
    out = tmp_path / "s.tsv"
    refused(["certify", toy_checkpoint, "--mode", "sequential", "--test", test, "--alpha", "5e-324", "--max", "1",
             "--sigma", "0.25", *CPU, "--out", out], capsys, "--alpha 5e-324 is too small")
    assert list(tmp_path.iterdir()) == []


def test_a_fixed_n_certify_at_the_smallest_alpha_abstains(toy_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "c.tsv"
    assert run(["certify", toy_checkpoint, "--alpha", "5e-324", "--max", "2", "--sigma", "0.25", "--n0", "5", "--n",
                "20", *CPU, "--out", out], capsys)[0] == 0
    assert [row.split("\t")[2] for row in out.read_text().splitlines()[1:]] == ["-1", "-1"]


# ------------------------------------------------------------------ any resumed setting: the extra images


def test_a_resumed_run_refuses_other_unlabelled_images_at_the_same_path(toy_checkpoint, tmp_path, capsys) -> None:
    images = tmp_path / "x.npz"
    extra = tmp_path / "extra.npz"
    rng = np.random.default_rng(0)
    np.savez(images, images=rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8))
    assert run(["pseudo-label", toy_checkpoint, "--images", images, "--out", extra, "--device", "cpu"], capsys)[0] == 0
    out = tmp_path / "run"
    assert run([*TRAIN, "--unlabelled", extra, "--out", out], capsys)[0] == 0
    np.savez(images, images=rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8))  # other images, same path
    assert run(["pseudo-label", toy_checkpoint, "--images", images, "--out", extra, "--force", "--device", "cpu"],
               capsys)[0] == 0
    before = snapshot(out)
    argv = [*TRAIN, "--unlabelled", extra, "--out", out, "--resume"]
    argv[argv.index("--epochs") + 1] = "2"
    refused(argv, capsys, "is not the file it was trained on")
    assert snapshot(out) == before


# ------------------------------------------------------------------ 4. a recipe cannot destroy data


@pytest.mark.parametrize("key", ["force", "resume"])
def test_a_recipe_cannot_force_or_resume(runs, tmp_path, capsys, key) -> None:
    out = copy_run(runs["classifier"], tmp_path / "c")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'dataset = "synthetic"\nout = "{out}"\n{key} = true\n')
    before = snapshot(out)
    refused(["train", "--config", recipe, *TRAIN[3:]], capsys, f"{key} cannot be set in a recipe")
    assert snapshot(out) == before


def test_a_resumed_training_run_refuses_other_training_data(runs, tmp_path, capsys, monkeypatch) -> None:
    """--data-dir is free to change on resume (a path), so the training data are compared by content."""
    from smoothadv import train as train_module

    real = train_module.get_dataset

    def other(name, split, data_dir=None, **kwargs):  # the user's --data-dir B: the same size, other images
        dataset = real(name, split, None, **kwargs)
        return dataset if data_dir is None else torch.utils.data.Subset(dataset, list(range(len(dataset)))[::-1])

    monkeypatch.setattr(train_module, "get_dataset", other)
    monkeypatch.setattr(train_module, "check_data_dir", lambda path: None)
    for kind, argv in (("classifier", TRAIN), ("denoiser", DENOISER)):
        out = copy_run(runs[kind], tmp_path / kind)
        before = snapshot(out)
        argv = [*argv, "--out", out, "--resume", "--data-dir", tmp_path]
        argv[argv.index("--epochs") + 1] = "2"
        refused(argv, capsys, "its training data differ from these")
        assert snapshot(out) == before
    out = copy_run(runs["classifier"], tmp_path / "same")  # the same data under another path resume
    argv = [*TRAIN, "--out", out, "--resume"]
    argv[argv.index("--epochs") + 1] = "2"
    assert run(argv, capsys)[0] == 0


def test_merge_refuses_shards_computed_on_other_data_and_accepts_old_sidecars(toy_checkpoint, tmp_path,
                                                                             capsys) -> None:
    out = _two_shards(toy_checkpoint, tmp_path)
    sidecar = Path(f"{out}.shard-1-of-2.args.json")
    recorded = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**recorded, "data_sha256": "0" * 64}))
    before = snapshot(tmp_path)
    refused(["merge", out], capsys, "data_sha256")
    assert snapshot(tmp_path) == before
    del recorded["data_sha256"]  # a shard written before the digest existed merges with one that has it
    sidecar.write_text(json.dumps(recorded))
    assert run(["merge", out], capsys)[0] == 0
