"""Shared helpers of the benchmark suite."""

from __future__ import annotations

import time

__all__ = ["best_of", "correlation"]


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one untimed warm-up call.

    The minimum is the figure least disturbed by other work on a shared machine.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def correlation(a, b) -> float:
    """Pearson correlation of two images (means removed)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
