import numpy as np
import pytest

from cryodask.prior import fit_prior


@pytest.mark.parametrize("n", [8, 64, 512])
def test_converges_in_a_bounded_number_of_iterations(n):
    rng = np.random.default_rng(n)
    truth = rng.normal(10.0, 2.0, n)
    errors = rng.uniform(0.5, 3.0, n)
    estimates = truth + errors * rng.normal(size=n)
    fit = fit_prior(estimates, errors)
    assert fit.converged and fit.iterations < 200 and fit.drift <= 0.01
    # Shrinkage helps: the posterior values are closer to the truth than the raw estimates.
    assert np.mean((fit.values - truth) ** 2) < np.mean((estimates - truth) ** 2)
    if n >= 64:
        assert fit.mean == pytest.approx(10.0, abs=0.6)
        assert fit.spread == pytest.approx(2.0, abs=0.8)


def test_precise_estimates_keep_their_values_and_missing_ones_get_the_prior():
    fit = fit_prior([1.0, 2.0, 3.0, np.nan], [1e-3, 1e-3, 1e-3, 1.0])
    np.testing.assert_allclose(fit.values[:3], [1.0, 2.0, 3.0], atol=1e-3)
    assert fit.values[3] == pytest.approx(fit.mean)


def test_no_spread_pulls_everything_to_the_mean():
    fit = fit_prior([5.0, 5.1, 4.9, 5.0], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(fit.values, fit.mean, atol=0.05)


def test_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        fit_prior([1.0], [0.1])
    with pytest.raises(ValueError, match="one length"):
        fit_prior([1.0, 2.0], [0.1])
