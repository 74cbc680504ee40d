"""The contracts of `Smooth` and `SoftSmoothed` at their edges: every public method checks its input, sample
counts, alpha and generator before drawing anything (a one-line SmoothAdvError, never a torch error from deep
inside the sampler); PREDICT and CERTIFY decide exactly at their thresholds as Cohen et al. write them (PREDICT
answers when the p-value equals alpha, CERTIFY certifies radius 0 when the lower bound equals 1/2); reused
buffers never serve a draw of another shape, size or dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothadv.errors import SmoothAdvError
from smoothadv.smoothing import ABSTAIN, Smooth, SoftSmoothed
from smoothadv.stats import binom_pvalue


class Constant(nn.Module):
    """Always class `label` of `classes`, whatever the input's shape."""

    def __init__(self, label: int = 0, classes: int = 3) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.classes, dtype=x.dtype)
        logits[:, self.label] = 1.0
        return logits


class SignOfSum(nn.Module):
    """Class 1 when the sample's values sum above 0, else class 0: its votes depend on every noise value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.reshape(x.shape[0], -1).sum(1)
        return torch.stack([-s, s], dim=1)


X = torch.full((1, 4, 4), 0.5)


# ------------------------------------------------------------------ every method checks before it samples

CALLS = {
    "sample_counts": lambda s, x, n, alpha, b, g: s.sample_counts(x, n, b, g),
    "predict": lambda s, x, n, alpha, b, g: s.predict(x, n, alpha, b, g),
    "certify": lambda s, x, n, alpha, b, g: s.certify(x, 4, n, alpha, b, g),
    "certify_many": lambda s, x, n, alpha, b, g: s.certify_many([x], 4, n, alpha, b, None if g is None else [g]),
    "certify_many_n0": lambda s, x, n, alpha, b, g: s.certify_many([x], n, 4, alpha, b, None if g is None else [g]),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.ones(1, 4, 4, dtype=torch.long)), "floating-point"),
    (dict(x=torch.full((1, 4, 4), float("nan"))), "NaN"),
    (dict(n=0), "positive integer"),
    (dict(batch=0), "batch_size"),
    (dict(generator=7), "torch.Generator"),
])
def test_every_method_refuses_a_bad_argument_before_sampling(call, bad, match) -> None:
    args = dict(x=X, n=8, alpha=0.1, batch=4, generator=None) | bad
    smooth = Smooth(Constant(), num_classes=3, sigma=0.25)
    with pytest.raises(SmoothAdvError, match=match):
        CALLS[call](smooth, args["x"], args["n"], args["alpha"], args["batch"], args["generator"])


@pytest.mark.parametrize("call", ["predict", "certify", "certify_many", "certify_many_n0"])
def test_alpha_outside_the_open_unit_interval_is_refused(call) -> None:
    smooth = Smooth(Constant(), num_classes=3, sigma=0.25)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(SmoothAdvError, match="alpha"):
            CALLS[call](smooth, X, 8, alpha, 4, None)


def test_a_one_element_input_is_an_input_and_an_empty_one_is_refused() -> None:
    image = Smooth(Constant(1), num_classes=3, sigma=0.25)
    assert image.certify(torch.full((1, 1, 1), 0.5), 10, 100, 0.001, 50).prediction == 1
    anything = Smooth(Constant(1), num_classes=3, sigma=0.25, domain=None)
    assert anything.predict(torch.tensor([0.5]), 20, 0.001, 8) == 1
    with pytest.raises(SmoothAdvError, match="empty"):
        anything.predict(torch.zeros(0), 20, 0.001, 8)


def test_certify_many_takes_any_tensor_without_a_domain_and_refuses_a_scalar() -> None:
    smooth = Smooth(Constant(2), num_classes=3, sigma=0.25, domain=None)
    batch = torch.zeros(3, 5)  # three inputs of shape (5,): a batch tensor is unbound along its first axis
    scalars = torch.tensor([0.1, 0.2])  # a batch of two scalar inputs
    for xs in (scalars, batch, scalars):  # one Smooth, its buffers reused across the shapes
        assert [c.prediction for c in smooth.certify_many(xs, 4, 50, 0.01, 16)] == [2] * len(xs)
    with pytest.raises(SmoothAdvError, match="sequence of images"):
        smooth.certify_many(torch.tensor(0.5), 4, 50, 0.01, 16)
    image = Smooth(Constant(2), num_classes=3, sigma=0.25)
    with pytest.raises(SmoothAdvError, match="sequence of images"):
        image.certify_many(torch.zeros(3, 4, 4), 4, 50, 0.01, 16)  # three (4, 4) "images": not (C, H, W)


@pytest.mark.parametrize("num_classes", [1, 0, 2.5])
def test_num_classes_must_be_an_integer_of_at_least_two(num_classes) -> None:
    with pytest.raises(SmoothAdvError, match="num_classes"):
        Smooth(Constant(), num_classes=num_classes, sigma=0.25)


# ------------------------------------------------------------------ decisions exactly at the thresholds


def test_predict_answers_when_the_p_value_equals_alpha() -> None:
    """Cohen et al.'s PREDICT abstains only if the p-value is above alpha: 8 votes of 8 give 2 / 2^8 exactly."""
    smooth = Smooth(Constant(1), num_classes=3, sigma=0.25)
    p = binom_pvalue(8, 8, 0.5)
    assert p == 2 / 2**8
    assert smooth.predict(X, 8, p, 8) == 1
    assert smooth.predict(X, 8, p * (1 - 1e-9), 8) == ABSTAIN


def test_certify_certifies_radius_zero_when_the_bound_equals_one_half() -> None:
    """CERTIFY abstains only if p_lower < 1/2: one unanimous estimation sample at alpha = 1/2 bounds p_A by
    alpha^(1/n) = 1/2 exactly, a certificate of radius sigma * Phi^-1(1/2) = 0."""
    smooth = Smooth(Constant(2), num_classes=3, sigma=0.25)
    cert = smooth.certify(X, 1, 1, 0.5, 1)
    assert (cert.prediction, cert.radius, cert.p_lower) == (2, 0.0, 0.5)
    [many] = smooth.certify_many([X], 1, 1, 0.5, 1)
    assert (many.prediction, many.radius) == (2, 0.0)


# ------------------------------------------------------------------ reused buffers


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_padded_rows_are_never_reused_across_dtypes_or_sizes(dtypes) -> None:
    """Inputs of 9 values are drawn as padded rows of 16 (a reused (rows, 16) buffer): a later draw of more rows or
    of another dtype gets the votes a fresh Smooth gives it."""
    x = torch.full((1, 3, 3), 0.0)
    used = Smooth(SignOfSum(), num_classes=2, sigma=0.5)
    used.sample_counts(x.to(dtypes[0]), 3, 3, torch.Generator().manual_seed(1))  # a buffer of 3 rows
    for num, dtype in [(40, dtypes[1]), (90, dtypes[0])]:
        fresh = Smooth(SignOfSum(), num_classes=2, sigma=0.5)
        expected = fresh.sample_counts(x.to(dtype), num, num, torch.Generator().manual_seed(2))
        got = used.sample_counts(x.to(dtype), num, num, torch.Generator().manual_seed(2))
        assert torch.equal(got, expected), (num, dtype)


def test_batch_buffers_are_never_reused_for_another_input_shape() -> None:
    """Shapes (1, 4, 4) then (2, 4, 4) then (2, 4, 8): each draw matches a fresh Smooth's."""
    used = Smooth(SignOfSum(), num_classes=2, sigma=0.5, domain=None)
    for shape in [(1, 4, 4), (2, 4, 4), (2, 4, 8), (1, 4, 4)]:
        x = torch.zeros(shape)
        fresh = Smooth(SignOfSum(), num_classes=2, sigma=0.5, domain=None)
        expected = fresh.sample_counts(x, 64, 16, torch.Generator().manual_seed(3))
        assert torch.equal(used.sample_counts(x, 64, 16, torch.Generator().manual_seed(3)), expected), shape


# ------------------------------------------------------------------ SoftSmoothed


@pytest.mark.parametrize("noise", [[[0.1]], torch.zeros(3, 2, dtype=torch.long), torch.zeros(3), torch.zeros(0, 2)])
def test_soft_smoothed_refuses_noise_that_is_not_a_float_tensor_of_draws(noise) -> None:
    with pytest.raises(SmoothAdvError, match="noise must be"):
        SoftSmoothed(Constant(), noise)


def test_soft_smoothed_takes_the_smallest_noise_and_inputs_of_any_shape() -> None:
    """(B, m) noise smooths scalar inputs; one draw of one input, (1, 1), is noise too."""
    probs = SoftSmoothed(SignOfSum(), torch.tensor([[0.3], [-0.3]]).view(2, 1))(torch.tensor([0.0, 0.0]))
    assert probs.shape == (2, 2)
    assert probs.exp()[0, 1] > 0.5 > probs.exp()[1, 1]
    assert SoftSmoothed(Constant(1, 2), torch.zeros(1, 1))(torch.zeros(1)).argmax().item() == 1


def test_soft_smoothed_refuses_an_input_that_does_not_match_its_noise() -> None:
    soft = SoftSmoothed(Constant(), torch.zeros(2, 3, 1, 4, 4))
    for x in [torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 4, 5), torch.zeros(2, 4, 4), [[0.0]]]:
        with pytest.raises(SmoothAdvError, match="must be a batch"):
            soft(x)


def test_the_ascent_direction_checks_its_labels() -> None:
    soft = SoftSmoothed(Constant(0, 3), torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(0)))
    x = torch.zeros(2, 1, 2, 2)
    assert soft.ascent_direction(x, torch.tensor([2, 0])).shape == (2, 1, 2, 2)
    for y in [torch.tensor([-1, 0]), torch.tensor([0, -1]), torch.tensor([3, 0]), torch.tensor([0, 3]),
              torch.tensor([0]), torch.tensor([[0, 1]])]:
        with pytest.raises(SmoothAdvError, match="labels in"):
            soft.ascent_direction(x, y)
