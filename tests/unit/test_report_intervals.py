"""`smoothadv report --ci`: 95% Clopper-Pearson intervals over test images on certified accuracies.

The intervals and the published rows in the table, through the command line: tests/e2e/test_cli_report.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from smoothadv.stats import clopper_pearson_interval, clopper_pearson_lower, clopper_pearson_upper


def test_clopper_pearson_interval_matches_the_beta_quantiles_and_the_one_sided_bounds() -> None:
    low, high = clopper_pearson_interval(np.array([0, 1, 3, 5]), 5)
    assert low[0] == 0.0 and high[-1] == 1.0
    assert high[0] == pytest.approx(1 - 0.025 ** (1 / 5)) and low[-1] == pytest.approx(0.025 ** (1 / 5))
    assert low[2] == pytest.approx(beta.ppf(0.025, 3, 3)) and high[2] == pytest.approx(beta.ppf(0.975, 4, 2))
    assert (low[2], high[2]) == pytest.approx((0.146633, 0.947255), abs=1e-6)  # the exact interval for 3 of 5
    for i, k in ((1, 1), (2, 3)):  # each end is the one-sided bound at 2.5%
        assert low[i] == pytest.approx(clopper_pearson_lower(k, 5, 0.025))
        assert high[i] == pytest.approx(clopper_pearson_upper(k, 5, 0.025))
    # 400 of 500 images: about +-3.6 pp
    low, high = clopper_pearson_interval(400, 500)
    assert 0.76 < float(low) < 0.765 and 0.83 < float(high) < 0.835
    with pytest.raises(ValueError):
        clopper_pearson_interval(6, 5)
