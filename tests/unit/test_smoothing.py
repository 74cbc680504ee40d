"""Smooth.predict / Smooth.certify against a linear base classifier with a known smoothed classifier."""

from __future__ import annotations

import pytest
import torch
from conftest import image_with_margin
from scipy.stats import binom, norm
from torch import nn

from smoothadv import ABSTAIN, Certificate, Smooth, SmoothAdvError, SoftSmoothed
from smoothadv.stats import max_certifiable_radius


def test_certify_unpacks_like_cohen_and_carries_detail(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.25)
    cert = smooth.certify(image_with_margin(0.3), 100, 2000, 0.001, 500, generator=torch.Generator().manual_seed(0))
    prediction, radius = cert
    assert isinstance(cert, Certificate) and prediction == 1 and cert.prediction == 1
    assert radius == cert.radius and 0 < radius <= 0.3
    assert cert.n == 2000 and cert.n0 == 100 and 0.5 < cert.p_lower < 1
    assert Smooth.ABSTAIN == ABSTAIN == -1
    # every count says what it counts: n0 selection, n estimation, samples = n0 + n forward passes
    assert cert.samples == 2100 and cert.tested_class == 1 and 0 < cert.count <= cert.n
    assert (cert[0], cert[1], len(cert), tuple(cert)) == (1, radius, 2, (1, radius))


def test_abstaining_certificate_keeps_the_tested_class(linear_model) -> None:
    cert = Smooth(linear_model, 2, 0.25).certify(image_with_margin(0.0), 100, 200, 0.001, 300,
                                                  generator=torch.Generator().manual_seed(0))
    assert cert.abstained and tuple(cert) == (ABSTAIN, 0.0) and cert.tested_class in (0, 1)
    assert cert.p_lower < 0.5 and cert.samples == 300


def test_sigma_assigned_on_smooth_is_the_noise_sigma(linear_model) -> None:
    # one source: the radius and the noise read the same sigma, also after an assignment
    smooth = Smooth(linear_model, 2, 0.25)
    smooth.sigma = 0.5
    assert smooth.sampler.sigma == 0.5 and smooth.sigma == 0.5
    gen = torch.Generator().manual_seed(0)
    cert = smooth.certify(image_with_margin(0.45), 10, 1000, 0.001, 1000, generator=gen)
    assert cert.radius == pytest.approx(0.5 * norm.ppf(cert.p_lower))
    with pytest.raises(SmoothAdvError, match="sigma"):
        smooth.sigma = 0.0
    assert smooth.sigma == 0.5


def test_certified_radius_never_exceeds_distance_beyond_alpha(linear_model) -> None:
    # 300 independent certifications at alpha = 0.1: the number of radii larger than the true radius (or wrong
    # class) is Binomial(300, q) with q <= 0.1; we require it below the 0.999 quantile of Binomial(300, 0.1).
    sigma, alpha, margin = 0.25, 0.1, 0.1
    smooth = Smooth(linear_model, 2, sigma)
    gen = torch.Generator().manual_seed(1)
    x = image_with_margin(margin)
    bad = 0
    for _ in range(300):
        prediction, radius = smooth.certify(x, 20, 200, alpha, 220, generator=gen)
        bad += prediction not in (1, ABSTAIN) or radius > margin
    assert bad <= binom.ppf(0.999, 300, alpha)


def test_certified_radius_approaches_true_radius_at_large_n(linear_model) -> None:
    sigma, margin = 0.25, 0.3  # p_A = Phi(1.2) = 0.885
    smooth = Smooth(linear_model, 2, sigma)
    prediction, radius = smooth.certify(image_with_margin(margin), 100, 100_000, 0.001, 20_000,
                                        generator=torch.Generator().manual_seed(2))
    assert prediction == 1
    assert 0.96 * margin <= radius <= margin  # CP slack at n = 1e5 is about 3% of the radius here


def test_far_from_boundary_radius_is_the_sample_size_cap(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.1)
    prediction, radius = smooth.certify(image_with_margin(0.45), 10, 1000, 0.001, 1000,
                                        generator=torch.Generator().manual_seed(3))
    assert prediction == 1 and radius == pytest.approx(max_certifiable_radius(1000, 0.001, 0.1))


def test_abstains_on_the_boundary(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.25)
    gen = torch.Generator().manual_seed(4)
    x = image_with_margin(0.0)
    certs = [smooth.certify(x, 50, 1000, 0.01, 1000, generator=gen) for _ in range(30)]
    predictions = [smooth.predict(x, 1000, 0.01, 1000, generator=gen) for _ in range(30)]
    assert sum(c.abstained for c in certs) >= 28  # each abstains with probability >= 0.99
    assert sum(p == ABSTAIN for p in predictions) >= 28


def test_predict_returns_the_smoothed_class(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.25)
    gen = torch.Generator().manual_seed(5)
    assert smooth.predict(image_with_margin(0.2), 1000, 0.001, 400, generator=gen) == 1
    assert smooth.predict(image_with_margin(-0.2), 1000, 0.001, 400, generator=gen) == 0


def test_counts_follow_the_binomial_law(linear_model) -> None:
    sigma, margin, n = 0.25, 0.1, 40_000
    counts = Smooth(linear_model, 2, sigma).sample_counts(image_with_margin(margin), n, 4096,
                                                         generator=torch.Generator().manual_seed(6))
    p = norm.cdf(margin / sigma)
    assert int(counts.sum()) == n
    assert abs(int(counts[1]) - n * p) <= 4.5 * (n * p * (1 - p)) ** 0.5


def test_seeded_runs_are_reproducible(linear_model) -> None:
    smooth = Smooth(linear_model, 2, 0.25)
    x = image_with_margin(0.05)
    a = smooth.certify(x, 100, 3000, 0.001, 700, generator=torch.Generator().manual_seed(7))
    b = smooth.certify(x, 100, 3000, 0.001, 700, generator=torch.Generator().manual_seed(7))
    assert (a.prediction, a.radius, a.count) == (b.prediction, b.radius, b.count)


def test_model_modes_are_restored() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    smooth = Smooth(model, 3, 0.5)
    smooth.certify(torch.rand(1, 4, 4), 10, 50, 0.01, 32)
    smooth.predict(torch.rand(1, 4, 4), 50, 0.01, 32)
    assert [m.training for m in model.modules()] == before


def test_soft_smoothed_with_zero_noise_is_log_softmax() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.rand(3, 3, 2, 2)
    soft = SoftSmoothed(base, torch.zeros(3, 1, 3, 2, 2))
    torch.testing.assert_close(soft(x), torch.log_softmax(base(x), dim=1))


def test_soft_smoothed_averages_probabilities_over_draws() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, noise = torch.rand(2, 1, 2, 2), torch.randn(2, 4, 1, 2, 2) * 0.3
    expected = torch.stack([torch.softmax(base(x + noise[:, i]), 1) for i in range(4)]).mean(0).log()
    torch.testing.assert_close(SoftSmoothed(base, noise)(x), expected)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.full((1, 4, 4), 1.5), "in \\[0, 1\\]"),
        (torch.full((1, 4, 4), float("nan")), "NaN"),
        (torch.zeros(4, 4), "shape"),
        (torch.zeros(1, 4, 4, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_images_are_refused(linear_model, x, message) -> None:
    with pytest.raises(SmoothAdvError, match=message):
        Smooth(linear_model, 2, 0.25).certify(x, 10, 10, 0.01, 10)


def test_wrong_channel_count_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(SmoothAdvError, match="rejected an input"):
        Smooth(model, 2, 0.25).predict(torch.rand(1, 8, 8), 10, 0.01, 10)


@pytest.mark.parametrize(("n0", "n", "alpha", "batch"), [(0, 10, 0.01, 10), (10, 0, 0.01, 10), (10, 10, 0.0, 10),
                                                         (10, 10, 1.0, 10), (10, 10, 0.01, 0)])
def test_bad_sample_arguments(linear_model, n0, n, alpha, batch) -> None:
    with pytest.raises(SmoothAdvError):
        Smooth(linear_model, 2, 0.25).certify(image_with_margin(0.1), n0, n, alpha, batch)


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("inf")])
def test_bad_sigma(linear_model, sigma) -> None:
    with pytest.raises(SmoothAdvError, match="sigma"):
        Smooth(linear_model, 2, sigma)
