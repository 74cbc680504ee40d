"""Denoised smoothing (Salman et al., NeurIPS 2020): the DnCNN, its objectives, checkpoints, f o D, and denoiser
training through the API (the command line's runs and evaluation paths: tests/e2e/test_cli_denoise.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from smoothadv import denoise
from smoothadv.denoise import (
    MSE,
    Classification,
    DenoisedClassifier,
    DnCNN,
    Stability,
    evaluate_denoiser,
)
from smoothadv.errors import SmoothAdvError
from smoothadv.models import Normalize, build_model, check_fits, load_denoiser, multiply_adds, save_denoiser
from smoothadv.settings import DenoiserTrainSettings
from smoothadv.train import DenoiserTrainee, run_loop, train_denoiser, train_epoch

CPU = torch.device("cpu")


# ------------------------------------------------------------------ the network


def test_fresh_dncnn_is_exactly_the_identity_with_the_papers_layers() -> None:
    torch.manual_seed(0)
    net = DnCNN(3, depth=17, width=64)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 17 and len(norms) == 15
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:])
    assert all(b.eps == 1e-4 and b.momentum == 0.95 for b in norms)
    w = convs[1].weight.flatten(1)  # orthogonal init: rows orthonormal (64 rows of 576)
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    x = torch.rand(2, 3, 11, 13)  # any image size
    for mode in (True, False):
        net.train(mode)
        assert torch.equal(net(x), x)
    small = DnCNN(1, depth=5, width=16)
    assert multiply_adds(small, (1, 28, 28)) == 784 * 9 * (16 + 3 * 16 * 16 + 16)
    assert multiply_adds(build_model("fashion_cnn", "fashion_mnist"), (1, 28, 28)) == \
        784 * 9 * 16 + 196 * 9 * 16 * 32 + 1568 * 64 + 64 * 10


def test_the_names_that_moved_out_are_still_importable_from_denoise() -> None:
    """Checkpoints and cost moved to `models`: what user code imported from `smoothadv.denoise` is the same object."""
    from smoothadv import models

    for name in ("save_denoiser", "load_denoiser", "multiply_adds"):
        assert getattr(denoise, name) is getattr(models, name)


# ------------------------------------------------------------------ objectives


@pytest.fixture
def one_thread():
    """Tiny tensors: thread synchronisation would cost more than the arithmetic on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mse_objective_converges_to_the_wiener_shrinkage_of_a_gaussian(one_thread) -> None:
    """x ~ N(mu, diag(s^2)), z = x + N(0, sigma^2 I): the best (linear, and Bayes) denoiser is
    D(z) = mu + s^2 / (s^2 + sigma^2) (z - mu). A linear D trained with the MSE objective must approach it."""
    torch.manual_seed(0)
    mu = torch.tensor([0.5, 0.3, 0.6, 0.4])
    s = torch.tensor([0.5, 0.2, 0.15, 0.3])
    sigma = 0.25
    shrink = s**2 / (s**2 + sigma**2)  # 0.80, 0.39, 0.26, 0.59
    best_w, best_b = torch.diag(shrink), mu - shrink * mu
    linear = nn.Linear(4, 4)
    denoiser = nn.Sequential(nn.Flatten(), linear, nn.Unflatten(1, (1, 2, 2)))
    data = torch.Generator().manual_seed(1)

    def batches(count: int):
        for _ in range(count):
            x = (mu + s * torch.randn(1024, 4, generator=data)).view(1024, 1, 2, 2)
            yield x, torch.zeros(1024, dtype=torch.long)

    def distance() -> float:
        with torch.no_grad():
            return float((linear.weight - best_w).norm() + (linear.bias - best_b).norm())

    start = distance()
    noise = torch.Generator().manual_seed(2)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=0.05)
    train_epoch(denoiser, MSE(sigma), optimizer, batches(300), CPU, generator=noise)
    middle = distance()
    for group in optimizer.param_groups:
        group["lr"] = 0.005
    loss = train_epoch(denoiser, MSE(sigma), optimizer, batches(200), CPU, generator=noise)["loss"]
    assert start > 2 and distance() < min(0.03, middle), (start, middle, distance())
    assert torch.allclose(linear.weight.detach().diagonal(), shrink, atol=0.01)
    bayes = float((shrink * sigma**2).mean())  # the Wiener filter's MSE per element
    assert loss == pytest.approx(bayes, rel=0.02)


class _BNClassifier(nn.Module):
    """A small classifier with BatchNorm (whose running statistics would move if f were in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), nn.Conv2d(3, 4, 3, padding=1),
                                  nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("kind", [Stability, Classification], ids=["stability", "classification"])
def test_training_through_f_never_changes_f(kind) -> None:
    """The loss is an objective of the one loop (`train.train_epoch`) holding f: f stays frozen, and several
    classifiers are used round-robin, one per step."""
    torch.manual_seed(0)
    f1, f2 = _BNClassifier(), _BNClassifier()  # two: query access goes round-robin through surrogates
    f1.train()
    f2.eval()
    before = [{k: v.clone() for k, v in f.state_dict().items()} for f in (f1, f2)]
    calls: list[int] = []
    f1.register_forward_hook(lambda *_: calls.append(1))
    f2.register_forward_hook(lambda *_: calls.append(2))
    denoiser = DnCNN(3, depth=3, width=4)
    start = {k: v.clone() for k, v in denoiser.state_dict().items()}
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
    x, y = torch.rand(32, 3, 8, 8), torch.arange(32) % 4
    objective = kind(0.25, (f1, f2))
    train_epoch(denoiser, objective, optimizer, iter([(x, y)] * 4), CPU, generator=torch.Generator().manual_seed(0))
    for f, saved in zip((f1, f2), before):
        state = f.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)  # weights and BatchNorm statistics, bit for bit
        assert all(p.grad is None and p.requires_grad for p in f.parameters())
    assert f1.training and not f2.training  # each classifier's mode is restored
    per_step = 2 if isinstance(objective, Stability) else 1  # stability also runs f on the clean x
    assert calls == [c for c in (1, 2, 1, 2) for _ in range(per_step)]
    assert any(not torch.equal(v, start[k]) for k, v in denoiser.state_dict().items() if k.endswith("weight"))


def test_objectives_need_a_classifier_except_mse() -> None:
    denoiser = DnCNN(3, depth=3, width=4)
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.1)
    batch = [(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    assert train_epoch(denoiser, MSE(0.25), optimizer, iter(batch), CPU)["acc"] != 0.0  # NaN: nothing to score
    with pytest.raises(SmoothAdvError, match="stability objective trains D through a classifier"):
        Stability(0.25)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(3)
    net = DnCNN(1, depth=4, width=6)
    net.train()
    net(torch.rand(8, 1, 10, 10))  # move the BatchNorm statistics
    with torch.no_grad():
        net.net[-1].weight.normal_()
    path = tmp_path / "d.pth.tar"
    save_denoiser(path, net, arch="dncnn_small", dataset="fashion_mnist", sigma=0.5, epoch=7,
                  history=[{"objective": {"name": "MSE", "sigma": 0.5}, "epochs": 7}])
    raw = torch.load(path, weights_only=True)  # the one checkpoint format of models.py, with a weights digest
    assert (raw["format"], raw["kind"], raw["sigma"]) == ("smoothadv-checkpoint", "denoiser", 0.5)
    assert "weights_sha256" in raw and "num_classes" not in raw
    loaded, meta = load_denoiser(path)
    assert meta["weights_verified"] is True
    assert (meta["sigma"], meta["epoch"], meta["depth"], meta["width"], meta["channels"]) == (0.5, 7, 4, 6, 1)
    assert meta["history"][0]["objective"]["name"] == "MSE"
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(3, 1, 10, 10)
    assert not loaded.training and torch.equal(loaded(x), net.eval()(x))


# ------------------------------------------------------------------ f o D through the API


def test_any_module_with_its_normalization_can_be_the_classifier(tmp_path) -> None:
    torch.manual_seed(0)
    f = _BNClassifier()
    saved = {k: v.clone() for k, v in f.state_dict().items()}
    settings = DenoiserTrainSettings(dataset="synthetic", out_dir=tmp_path, objective="classification", epochs=1,
                                     batch_size=64, train_subset=64, eval_subset=16, depth=3, width=4,
                                     progress=False)
    path = train_denoiser(settings, classifiers=[f])
    assert all(torch.equal(v, saved[k]) for k, v in f.state_dict().items())
    denoiser, meta = load_denoiser(path)
    assert meta["classifiers"] == [{"module": "_BNClassifier"}]
    composed = DenoisedClassifier(denoiser, f).eval()
    assert composed.denoiser is denoiser and composed(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(SmoothAdvError, match="exists; pass --resume"):
        train_denoiser(settings, classifiers=[f])


def test_a_module_that_changes_the_image_shape_does_not_fit() -> None:
    f = _BNClassifier()
    check_fits(DnCNN(3, depth=3, width=4), f, (3, 8, 8), 3)
    with pytest.raises(SmoothAdvError, match=r"turns \(3, 8, 8\) images into \(3, 4, 4\)"):
        check_fits(nn.AvgPool2d(2), f, (3, 8, 8))
    with pytest.raises(SmoothAdvError, match="does not fit the classifier's"):
        check_fits(nn.Conv2d(1, 1, 1), f, (3, 8, 8))  # a gray-image module fed the classifier's color images
    with pytest.raises(SmoothAdvError, match="turns .* into \\(1, 8, 8\\)"):
        check_fits(nn.Conv2d(3, 1, 1), f, (3, 8, 8))


# ------------------------------------------------------------------ the one checkpoint format, the one loop


REPOSITORY = Path(__file__).resolve().parents[2]
COMMITTED = REPOSITORY / "results" / "denoised" / "runs"


def test_denoisers_of_the_earlier_format_still_load_unverified() -> None:
    for name in ("denoiser_mse", "denoiser_stability"):
        path = COMMITTED / name / "denoiser.pth.tar"
        assert torch.load(path, weights_only=True)["format"] == "smoothadv-denoiser"
        denoiser, meta = load_denoiser(path)
        assert meta["weights_verified"] is False and meta["sigma"] == 0.25 and isinstance(denoiser, DnCNN)
        assert [stage["objective"]["name"] for stage in meta["history"]][0] == "MSE"
        composed = DenoisedClassifier(denoiser, build_model("fashion_cnn", "fashion_mnist")).eval()
        assert composed(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_psnr_of_a_nan_mse_is_nan() -> None:
    class Broken(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z * math.nan

    result = evaluate_denoiser(Broken(), [(torch.rand(4, 1, 6, 6), torch.zeros(4, dtype=torch.long))], 0.25)
    assert math.isnan(result["mse"]) and math.isnan(result["psnr"])


def test_the_loop_refuses_an_objective_of_another_sigma_before_writing(tmp_path) -> None:
    settings = DenoiserTrainSettings(dataset="synthetic", out_dir=tmp_path / "run", epochs=1, progress=False)
    objective = MSE(1.0)
    trainee = DenoiserTrainee(settings, [], None, [], objective)
    with pytest.raises(SmoothAdvError, match="sigma 1 but the settings say --sigma 0.25"):
        run_loop(settings, objective, trainee)
    assert not (tmp_path / "run").exists()


def test_query_access_goes_round_robin_across_epochs_and_the_target_only_measures(tmp_path) -> None:
    torch.manual_seed(0)
    surrogates, target = (_BNClassifier(), _BNClassifier()), _BNClassifier()
    calls: list[int] = []
    for number, f in enumerate(surrogates):
        f.register_forward_hook(lambda *_, number=number: calls.append(number))
    target.register_forward_hook(lambda *_: calls.append(9))
    settings = DenoiserTrainSettings(dataset="synthetic", out_dir=tmp_path, objective="classification", epochs=2,
                                     batch_size=32, train_subset=96, eval_subset=16, depth=3, width=4, progress=False)
    train_denoiser(settings, classifiers=list(surrogates), eval_classifier=target)
    fits, steps = calls[:3], [c for c in calls[3:] if c != 9]
    assert fits == [0, 1, 9]  # each classifier is checked to fit the denoiser first
    assert steps == [0, 1, 0, 1, 0, 1]  # 3 steps an epoch: epoch 2 goes on at step 3, through surrogate 1
    assert calls.count(9) == 1 + 2 * 2  # the target: the fit check, then 2 evaluations (f(D(x+d)), f(x+d)) an epoch
