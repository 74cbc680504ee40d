"""The radius-distribution figure of `report.plot_radius_cdf`: the certified radii it draws, the DKW band, the
p_A variant, and its refusals (one-line errors, no file written)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write_cdf_tsv

from smoothadv.errors import SmoothAdvError
from smoothadv.report import certified_radii, dkw_halfwidth, load_results, plot_radius_cdf
from smoothadv.stats import certified_accuracy


def test_certified_radii_put_wrong_and_abstained_examples_below_every_radius(tmp_path) -> None:
    results = load_results(write_cdf_tsv(tmp_path / "a.tsv"))
    radii = certified_radii(results)
    assert list(radii) == [0.10, -math.inf, -math.inf, 0.55, 0.30]
    for r in (0.0, 0.1, 0.3, 0.5, 0.6):  # the share at or above r is the certified accuracy at r
        assert np.mean(radii >= r) == pytest.approx(certified_accuracy(results.radius, results.correct, [r])[0])


def test_dkw_band_matches_its_formula_and_shrinks_with_more_images() -> None:
    assert dkw_halfwidth(500) == pytest.approx(math.sqrt(math.log(40) / 1000))
    assert dkw_halfwidth(2000) < dkw_halfwidth(500)
    with pytest.raises(SmoothAdvError):
        dkw_halfwidth(0)


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plot_radius_cdf_writes_the_figure(tmp_path, suffix) -> None:
    a = load_results(write_cdf_tsv(tmp_path / "a.tsv"))
    b = load_results(write_cdf_tsv(tmp_path / "b.tsv", [(i, 1, 1, 0.2 * i, 1) for i in range(5)]))
    out = plot_radius_cdf({"A": a, "B": b}, tmp_path / f"cdf.{suffix}")
    assert out.exists() and out.stat().st_size > 1000
    sigma = {"A": 0.25, "B": 0.5}
    assert plot_radius_cdf({"A": a, "B": b}, tmp_path / f"p.{suffix}", quantity="p_lower", sigma=sigma).exists()


def test_plot_radius_cdf_refuses_bad_input(tmp_path) -> None:
    a = load_results(write_cdf_tsv(tmp_path / "a.tsv"))
    with pytest.raises(SmoothAdvError, match="sigma"):
        plot_radius_cdf({"A": a}, tmp_path / "p.png", quantity="p_lower")
    with pytest.raises(SmoothAdvError, match="quantity"):
        plot_radius_cdf({"A": a}, tmp_path / "q.png", quantity="acr")  # type: ignore[arg-type]
    with pytest.raises(SmoothAdvError, match="nothing"):
        plot_radius_cdf({}, tmp_path / "e.png")
    assert not list(tmp_path.glob("*.png"))
