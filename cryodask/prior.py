"""Dataset priors for per-micrograph parameters: empirical Bayes, iterated to convergence.

Each micrograph's estimate ``x_i`` of a parameter comes with a standard error ``s_i``. The
dataset's prior for the parameter is a normal ``N(mu, tau²)``: its centre and spread across
micrographs. Given the prior each micrograph's value is its posterior mean (map); given the
values the prior is re-estimated (reduce); this repeats until no value moves by more than
``tolerance`` of its standard error (DESIGN.md: "converges to minimum uncertainty").
Micrographs whose estimate is poor are pulled towards the dataset; well-measured ones keep
their own value.

References
----------
Efron & Morris (1975) Data analysis using Stein's estimator and its generalizations,
J. Am. Stat. Assoc. 70, 311.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PriorFit", "fit_prior"]


@dataclass(frozen=True)
class PriorFit:
    """The converged prior of one parameter and the micrographs' values under it."""

    values: np.ndarray  # (n,) posterior means
    errors: np.ndarray  # (n,) posterior standard deviations
    mean: float  # the prior's centre
    spread: float  # the prior's standard deviation across micrographs (tau)
    iterations: int
    drift: float  # the last iteration's largest move, in standard errors
    converged: bool


def fit_prior(estimates, errors, *, tolerance: float = 0.01, max_iterations: int = 200) -> PriorFit:
    """Fit a normal prior to per-micrograph estimates with standard errors.

    Parameters
    ----------
    estimates : (n,) array
        Finite values are used; NaN entries (no estimate) get the prior mean.
    errors : (n,) array
        Their standard errors, > 0.
    tolerance : float
        Stop when no value moves by more than this many of its standard errors.
    max_iterations : int

    Returns
    -------
    PriorFit

    Examples
    --------
    >>> fit = fit_prior([1.0, 1.2, 0.8, 5.0], [0.1, 0.1, 0.1, 10.0])
    >>> round(fit.mean, 2), round(float(fit.values[3]), 2), fit.converged
    (1.0, 1.0, True)
    """
    x = np.asarray(estimates, dtype=np.float64)
    s = np.asarray(errors, dtype=np.float64)
    if x.shape != s.shape or x.ndim != 1:
        raise ValueError(f"estimates and errors must be 1D of one length, got {x.shape} and {s.shape}")
    have = np.isfinite(x) & np.isfinite(s) & (s > 0)
    if have.sum() < 2:
        raise ValueError("a prior needs at least two micrographs with finite estimates and errors")
    xs, ss = x[have], s[have]
    w = 1.0 / ss**2
    mu = float((w * xs).sum() / w.sum())
    tau2 = max(float(np.var(xs)) - float(np.mean(ss**2)), 0.0)
    values = xs.copy()
    drift, iterations = np.inf, 0
    for iterations in range(1, max_iterations + 1):
        if tau2 > 0:
            post_var = 1.0 / (w + 1.0 / tau2)
            new = post_var * (w * xs + mu / tau2)
        else:
            post_var = np.zeros_like(xs)
            new = np.full_like(xs, mu)
        drift = float(np.max(np.abs(new - values) / ss))
        values = new
        # Reduce: the prior from the posteriors (EM for a normal hierarchy).
        mu = float(values.mean())
        tau2 = float(np.mean((values - mu) ** 2 + post_var))
        if drift <= tolerance:
            break
    post_var = 1.0 / (w + 1.0 / tau2) if tau2 > 0 else np.zeros_like(xs)
    out_values = np.full_like(x, mu)
    out_errors = np.full_like(x, np.sqrt(tau2))
    out_values[have] = post_var * (w * xs + mu / tau2) if tau2 > 0 else mu
    out_errors[have] = np.sqrt(post_var)
    return PriorFit(values=out_values, errors=out_errors, mean=mu, spread=float(np.sqrt(tau2)),
                    iterations=iterations, drift=drift, converged=drift <= tolerance)
