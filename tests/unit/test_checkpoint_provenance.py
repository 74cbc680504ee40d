"""Provenance of checkpoints: `weights_verified` means a weights digest is in the file, was recomputed over the
weights loaded from it, and equals it. On every load path (a registered architecture's checkpoint, your own
module's, a denoiser's, a converted Cohen/Salman or earlier-format file, a training run's resume), weights
changed after saving with the digest kept are refused in one line, and a file without a digest loads unverified.

Each tampering test fails if the comparison of the digests is disabled (the tampered weights would load)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from smoothadv.archs import arch_info
from smoothadv.denoise import DnCNN
from smoothadv.errors import SmoothAdvError
from smoothadv.models import (
    DIGEST,
    attach_denoiser,
    build_model,
    convert_trusted_checkpoint,
    load_checkpoint,
    load_denoiser,
    load_weights,
    normalization_spec,
    read_checkpoint,
    save_checkpoint,
    save_denoiser,
    weights_digest,
)
from smoothadv.objectives import GaussianAugmentation
from smoothadv.settings import DenoiserTrainSettings, TrainSettings
from smoothadv.train import fit, train_denoiser

TAMPERED = "its weights do not match the digest recorded when it was saved"
EARLIER_DENOISER = Path(__file__).resolve().parents[2] / "results" / "denoised" / "runs" / "denoiser_mse" / \
    "denoiser.pth.tar"


class MyNet(nn.Module):
    """A module of your own (no registered architecture)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _tamper(path: Path) -> None:
    """Change one weight after saving and keep the recorded digest (what a digest exists to catch)."""
    payload = torch.load(path, weights_only=True)
    assert isinstance(payload.get(DIGEST), str)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    payload["state_dict"][name].view(-1)[0] += 0.5
    torch.save(payload, path)


def _strip_digest(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    del payload[DIGEST]
    torch.save(payload, path)


def _refused(load: Callable[[], object], path: Path) -> None:
    with pytest.raises(SmoothAdvError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message and TAMPERED in message and str(path) in message, message


# ------------------------------------------------------------------ the files of each load path


def _registered(tmp_path: Path) -> Path:
    path = tmp_path / "toy.pth.tar"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.25)
    return path


def _own(tmp_path: Path) -> Path:
    path = tmp_path / "mine.pt"
    torch.manual_seed(0)
    save_checkpoint(path, MyNet(), num_classes=4, sigma=0.25)
    return path


def _denoiser(tmp_path: Path) -> Path:
    path = tmp_path / "denoiser.pth.tar"
    torch.manual_seed(0)
    net = DnCNN(3, depth=3, width=4)
    with torch.no_grad():
        net.net[-1].weight.normal_()  # not the identity: the loaded weights must be the saved ones
    save_denoiser(path, net, arch="dncnn_small", dataset="synthetic", sigma=0.25)
    return path


def _cohen_file(tmp_path: Path) -> Path:
    """A released file as Cohen et al.'s code writes it: "1.module." keys, no digest, an argparse Namespace."""
    path = tmp_path / "cohen.pth.tar"
    torch.manual_seed(0)
    net = arch_info("cifar_resnet20").build(10)
    torch.save({"arch": "cifar_resnet20", "epoch": 90, "args": argparse.Namespace(lr=0.1),
                "state_dict": {f"1.module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def _converted_cohen(tmp_path: Path) -> Path:
    path = tmp_path / "cohen-converted.pth.tar"
    convert_trusted_checkpoint(_cohen_file(tmp_path), path)
    return path


def _converted_earlier_denoiser(tmp_path: Path) -> Path:
    path = tmp_path / "denoiser-converted.pth.tar"
    convert_trusted_checkpoint(EARLIER_DENOISER, path)
    return path


def _classifier_for_denoiser() -> nn.Module:
    torch.manual_seed(0)
    return build_model("toy_cnn", "synthetic").eval()


LOADS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], dict]]] = {
    "registered: load_checkpoint": (_registered, lambda p: load_checkpoint(p)[1]),
    "registered: load_weights": (_registered, lambda p: load_weights(p, build_model("toy_cnn", "synthetic"))),
    "own module: load_weights": (_own, lambda p: load_weights(p, MyNet())),
    "own module: load_checkpoint(model=)": (_own, lambda p: load_checkpoint(p, model=MyNet())[1]),
    "denoiser: load_denoiser": (_denoiser, lambda p: load_denoiser(p)[1]),
    "denoiser: attach_denoiser": (_denoiser, lambda p: attach_denoiser(_classifier_for_denoiser(), p, sigma=0.25,
                                                                       shape=(3, 8, 8))[1]),
    "converted Cohen/Salman: load_checkpoint": (_converted_cohen,
                                                lambda p: load_checkpoint(p, normalization="normalize")[1]),
    "converted Cohen/Salman: load_weights": (_converted_cohen,
                                             lambda p: load_weights(p, build_model("cifar_resnet20", "cifar10"))),
    "converted earlier denoiser: load_denoiser": (_converted_earlier_denoiser, lambda p: load_denoiser(p)[1]),
}


@pytest.mark.parametrize("load", list(LOADS))
def test_intact_weights_are_verified_and_loaded_as_saved(tmp_path, load) -> None:
    make, open_ = LOADS[load]
    path = make(tmp_path)
    assert open_(path)["weights_verified"] is True
    payload = torch.load(path, weights_only=True)
    assert payload[DIGEST] == weights_digest(payload["state_dict"])


@pytest.mark.parametrize("load", list(LOADS))
def test_weights_changed_after_saving_are_refused_in_one_line(tmp_path, load) -> None:
    make, open_ = LOADS[load]
    path = make(tmp_path)
    _tamper(path)
    torch.load(path, weights_only=True)  # torch itself loads it without complaint
    _refused(lambda: open_(path), path)
    _refused(lambda: read_checkpoint(path), path)


@pytest.mark.parametrize("load", list(LOADS))
def test_a_file_without_a_digest_loads_unverified(tmp_path, load) -> None:
    make, open_ = LOADS[load]
    path = make(tmp_path)
    _strip_digest(path)
    assert open_(path)["weights_verified"] is False


def test_a_file_cannot_claim_to_be_verified(tmp_path) -> None:
    """`weights_verified` is the loader's finding, never a field the file holds."""
    path = _registered(tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload[DIGEST]
    torch.save({**payload, "weights_verified": True}, path)
    assert load_checkpoint(path)[1]["weights_verified"] is False
    assert load_weights(path, build_model("toy_cnn", "synthetic"))["weights_verified"] is False


def test_files_without_a_digest_of_other_origins_load_unverified(tmp_path) -> None:
    """Cohen/Salman files (plain data, not converted) and denoisers of the earlier format carry no digest."""
    cohen = _cohen_file(tmp_path)
    payload = torch.load(cohen, weights_only=False)
    del payload["args"]
    torch.save(payload, cohen)
    assert load_checkpoint(cohen, normalization="center")[1]["weights_verified"] is False
    assert load_denoiser(EARLIER_DENOISER)[1]["weights_verified"] is False


def test_a_tampered_file_with_a_digest_is_never_converted_into_a_verified_one(tmp_path) -> None:
    source = _registered(tmp_path)
    _tamper(source)
    converted = tmp_path / "converted.pth.tar"
    _refused(lambda: convert_trusted_checkpoint(source, converted), source)
    assert not converted.exists()


# ------------------------------------------------------------------ training runs: resume, --init, --pretrained


def _classifier_run(out: Path, **extra) -> TrainSettings:
    values = dict(dataset="synthetic", arch="toy_cnn", out_dir=out, epochs=1, batch_size=32, train_subset=64,
                  eval_subset=16, progress=False, device="cpu")
    return TrainSettings(**{**values, **extra})  # type: ignore[arg-type]


def _denoiser_run(out: Path, **extra) -> DenoiserTrainSettings:
    values = dict(dataset="synthetic", out_dir=out, epochs=1, batch_size=32, train_subset=64, eval_subset=16, depth=3,
                  width=4, progress=False, device="cpu")
    return DenoiserTrainSettings(**{**values, **extra})  # type: ignore[arg-type]


RUNS: dict[str, Callable[..., Path]] = {
    "classifier": lambda out, **extra: fit(_classifier_run(out, **extra), GaussianAugmentation(0.25)),
    "denoiser": lambda out, **extra: train_denoiser(_denoiser_run(out, **extra)),
}


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_run_does_not_resume_from_a_tampered_checkpoint(tmp_path, kind) -> None:
    run = RUNS[kind]
    checkpoint = run(tmp_path / "run")
    _tamper(checkpoint)
    before = checkpoint.read_bytes()
    _refused(lambda: run(tmp_path / "run", epochs=2, resume=True), checkpoint)
    assert checkpoint.read_bytes() == before


def test_a_run_does_not_start_from_a_tampered_pretrained_or_init_file(tmp_path) -> None:
    pretrained = _registered(tmp_path)
    _tamper(pretrained)
    _refused(lambda: RUNS["classifier"](tmp_path / "c", pretrained=str(pretrained)), pretrained)
    init = _denoiser(tmp_path)
    _tamper(init)
    _refused(lambda: RUNS["denoiser"](tmp_path / "d", init=str(init)), init)
    classifier = _registered(tmp_path / "f")
    _tamper(classifier)
    _refused(lambda: RUNS["denoiser"](tmp_path / "e", objective="stability", classifier=(str(classifier),)),
             classifier)
