"""smoothadv's pieces in a researcher's own code: inputs of their own domain, their own datasets, errors in Python.

Each test calls the library as a researcher's script would (their model, their tensors, their dataset), and
checks the result or the one-line error that tells them what to write.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from smoothadv import PGDL2, Smooth, SmoothAdvError, SoftSmoothed
from smoothadv.attacks import check_batch
from smoothadv.evaluate import certify_dataset, predict_dataset


class Threshold(nn.Module):
    """Class 1 iff the first coordinate of the input exceeds `at` (any input shape)."""

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = x.flatten(1)[:, 0] - self.at
        return torch.stack([-margin, margin], dim=1) * 100


def test_default_domain_is_unit_images_and_says_how_to_change_it() -> None:
    smooth = Smooth(Threshold(0.5), 2, 0.25)
    with pytest.raises(SmoothAdvError, match=r"values in \[0, 1\], got range .*domain=\(lo, hi\)\), or domain=None"):
        smooth.predict(torch.full((1, 2, 2), 2.0), n=10, alpha=0.001, batch_size=10)
    with pytest.raises(SmoothAdvError, match=r"shape \(C, H, W\).*domain=None"):
        smooth.predict(torch.rand(4), n=10, alpha=0.001, batch_size=10)


def test_images_in_minus_one_one_and_0_255() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.full((1, 2, 2), -0.8)
    smooth = Smooth(Threshold(0.0), 2, 0.25, domain=(-1.0, 1.0))
    prediction, radius = smooth.certify(x, n0=20, n=200, alpha=0.001, batch_size=100, generator=gen)
    assert prediction == 0 and 0 < radius <= 0.8  # the distance to the boundary, in the domain's units

    pixels = Smooth(Threshold(128.0), 2, 10.0, domain=(0, 255))
    prediction, radius = pixels.certify(torch.full((3, 2, 2), 200.0), 20, 200, 0.001, 100, generator=gen)
    assert prediction == 1 and 10 < radius <= 72  # grey levels: sigma and radius in 0-255 units
    with pytest.raises(SmoothAdvError, match=r"values in \[0, 255\]"):
        pixels.certify(torch.full((3, 2, 2), 300.0), 20, 200, 0.001, 100)


def test_any_finite_tensor_with_domain_none() -> None:
    """Pre-normalized features or vectors: any shape; the model gets batches (B, *x.shape)."""
    smooth = Smooth(Threshold(0.0), 2, 0.5, domain=None)
    gen = torch.Generator().manual_seed(1)
    features = torch.tensor([3.0, -7.0, 12.0])
    prediction, radius = smooth.certify(features, 20, 200, 0.001, 50, generator=gen)
    assert prediction == 1 and 0 < radius <= 3.0
    assert smooth.predict(torch.tensor([[-4.0, 0.0]]), 100, 0.001, 50, generator=gen) == 0
    certs = smooth.certify_many(torch.tensor([[3.0, 0.0], [-3.0, 0.0]]), 20, 200, 0.001, 100)
    assert [c.prediction for c in certs] == [1, 0]
    with pytest.raises(SmoothAdvError, match="NaN or Inf"):
        smooth.predict(torch.tensor([math.inf]), 10, 0.001, 10)
    with pytest.raises(SmoothAdvError, match="floating-point tensor"):
        smooth.predict(torch.tensor([1, 2]), 10, 0.001, 10)


def test_a_bad_domain_is_refused() -> None:
    smooth = Smooth(Threshold(0.5), 2, 0.25)
    for domain in [(1.0, 0.0), (0.0,), "0,1", (0.0, float("nan"))]:
        with pytest.raises(SmoothAdvError, match="domain must be"):
            Smooth(Threshold(0.5), 2, 0.25, domain=domain)  # type: ignore[arg-type]
        with pytest.raises(SmoothAdvError, match="domain must be"):
            smooth.domain = domain  # type: ignore[assignment]
    smooth.domain = (-1, 1)
    assert smooth.domain == (-1.0, 1.0)
    assert smooth.predict(torch.full((1, 2, 2), -0.5), 10, 0.01, 10) in (0, -1)


def test_the_attack_batch_check_takes_the_domain() -> None:
    y = torch.tensor([0, 1])
    x = torch.full((2, 3), 200.0)
    with pytest.raises(SmoothAdvError, match=r"values in \[0, 1\]"):
        check_batch(x, y)
    assert check_batch(x, y, domain=(0, 255)) == 1
    assert check_batch(x * -1e6, y, domain=None) == 1
    with pytest.raises(SmoothAdvError, match=r"values in \[-1, 1\]"):
        check_batch(x, y, domain=(-1.0, 1.0))


def test_soft_smoothed_names_the_noise_layout() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(SmoothAdvError, match=r"noise must be a floating-point tensor \(B, m, C, H, W\).*shape \(3,\)"):
        SoftSmoothed(net, torch.zeros(3))
    soft = SoftSmoothed(net, torch.zeros(2, 4, 3, 2, 2))
    assert soft(torch.rand(2, 3, 2, 2)).shape == (2, 3)
    with pytest.raises(SmoothAdvError, match=r"input must be a batch \(2, 3, 2, 2\) matching its noise "
                                             r"\(B, m, C, H, W\) = \(2, 4, 3, 2, 2\), got \(3, 2, 2\)"):
        soft(torch.rand(3, 2, 2))
    with pytest.raises(ValueError):  # still a ValueError for code that caught the old one
        PGDL2(eps=0.5, steps=1)(soft, torch.rand(5, 3, 2, 2), torch.zeros(5, dtype=torch.long))


class PilLike:
    """What a torchvision dataset without ToTensor returns: a PIL image (only its duck type here)."""

    def getpixel(self, xy):  # pragma: no cover - never called
        return 0


class MyDataset(Dataset):
    def __init__(self, item) -> None:
        self.item = item

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        return self.item


def test_dataset_without_to_tensor_says_what_to_add() -> None:
    smooth = Smooth(Threshold(0.5), 2, 0.25)
    with pytest.raises(SmoothAdvError, match=r"dataset\[0\] returned a .*PilLike as its input, not a torch.Tensor: "
                                             r"add transforms.ToTensor\(\)"):
        list(certify_dataset(smooth, MyDataset((PilLike(), 1)), [0], n0=10, n=20, alpha=0.001, batch_size=10))
    with pytest.raises(SmoothAdvError, match=r"dataset\[1\] must be an \(input, label\) pair"):
        list(predict_dataset(smooth, MyDataset(torch.rand(1, 2, 2)), [1], n=10, alpha=0.001, batch_size=10))
    with pytest.raises(SmoothAdvError, match="integer class label"):
        list(predict_dataset(smooth, MyDataset((torch.rand(1, 2, 2), "cat")), [0], n=10, alpha=0.001,
                             batch_size=10))
    rows = list(predict_dataset(smooth, MyDataset((torch.full((1, 2, 2), 0.9), torch.tensor(1))), [0, 1], n=50,
                                alpha=0.001, batch_size=50))
    assert [row.label for row in rows] == [1, 1]  # a tensor label is an integer label


# ------------------------------------------------------------------ randomness: one convention (smoothadv.seeds)


def test_one_generator_per_call_one_per_input_for_many() -> None:
    from smoothadv.seeds import example_generator

    smooth = Smooth(Threshold(0.5), 2, 0.25)
    xs = [torch.full((1, 2, 2), v) for v in (0.45, 0.55, 0.6)]
    alone = [smooth.certify(x, 10, 50, 0.01, 16, generator=example_generator(7, i, "cpu")) for i, x in enumerate(xs)]
    many = smooth.certify_many(xs, 10, 50, 0.01, 16, generators=[example_generator(7, i, "cpu") for i in range(3)])
    assert many == alone
    with pytest.raises(SmoothAdvError, match="one torch.Generator per input, a list of 3"):
        smooth.certify_many(xs, 10, 50, 0.01, 16, generators=torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(SmoothAdvError, match=r"generator must be a torch.Generator or None, got int .*manual_seed"):
        smooth.predict(xs[0], 10, 0.01, 16, generator=0)  # type: ignore[arg-type]


def test_certify_sequential_splits_its_generator_as_documented() -> None:
    from smoothadv import SequentialConfig, certify_sequential
    from smoothadv.seeds import split_generator
    from smoothadv.sequential import certify_sequential_many

    smooth = Smooth(Threshold(0.5), 2, 0.25)
    x = torch.full((1, 2, 2), 0.7)
    config = SequentialConfig.for_budget(0.25, 256)
    one = certify_sequential(smooth, x, config, batch_size=64, generator=torch.Generator().manual_seed(3))
    selection, estimation = split_generator(torch.Generator().manual_seed(3), x.device)
    two = certify_sequential_many(smooth, [x], config, batch_size=64, selection_generators=[selection],
                                  estimation_generators=[estimation])[0]
    assert one == two and one.prediction == 1


def test_sequential_certification_of_your_own_inputs_and_dataset() -> None:
    from smoothadv import SequentialConfig, certify_sequential
    from smoothadv.sequential import certify_sequential_dataset, certify_sequential_many

    smooth = Smooth(Threshold(0.0), 2, 0.5, domain=None)
    config = SequentialConfig.for_budget(0.5, 256)
    cert = certify_sequential(smooth, torch.tensor([3.0, 1.0]), config, batch_size=64,
                              generator=torch.Generator().manual_seed(0))
    assert cert.prediction == 1
    xs = [torch.tensor([3.0, 1.0]), torch.tensor([-3.0, 1.0])]
    many = certify_sequential_many(smooth, xs, config, batch_size=64,
                                   generators=[torch.Generator().manual_seed(i) for i in range(2)])
    alone = [certify_sequential(smooth, x, config, batch_size=64, generator=torch.Generator().manual_seed(i))
             for i, x in enumerate(xs)]
    assert many == alone and [c.prediction for c in many] == [1, 0]
    with pytest.raises(SmoothAdvError, match="add transforms.ToTensor"):
        list(certify_sequential_dataset(Smooth(Threshold(0.5), 2, 0.5), MyDataset((PilLike(), 1)), [0],
                                        config=config, batch_size=64))


def test_attacks_take_the_domain_on_the_call() -> None:
    from smoothadv import DDN

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2) * 255, torch.tensor([0, 1, 2, 0])
    for attack in (PGDL2(eps=20.0, steps=5), DDN(eps=20.0, steps=5)):
        with pytest.raises(SmoothAdvError, match=r"values in \[0, 1\]"):
            attack(net, x, y)
        x_adv = attack(net, x, y, domain=(0, 255))
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 255
        assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 20.0 + 1e-3
    features = torch.randn(4, 6) * 10
    x_adv = PGDL2(eps=1.0, steps=3)(nn.Linear(6, 3), features, y, domain=None)  # any values, no box
    assert float((x_adv - features).norm(dim=1).max()) <= 1.0 + 1e-5

