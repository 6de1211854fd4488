"""Shared helpers of the benchmark suite."""

from __future__ import annotations

import time

__all__ = ["best_of", "correlation", "restore_as_pipeline", "write_json"]


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


def correlation_by_band(a, b, edges_per_pixel) -> list:
    """:func:`correlation` split over bands of spatial frequency: by Parseval, the
    correlation is the sum over Fourier pixels of ``Re(A* B)`` over the norms, and each
    band's part is that sum over its pixels (``edges_per_pixel``: band edges in cycles per
    pixel, ascending). The parts sum to the correlation when the bands cover 0-Nyquist."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    fa, fb = np.fft.fft2(a - a.mean()), np.fft.fft2(b - b.mean())
    cross = (fa.conj() * fb).real
    norm = np.sqrt((np.abs(fa) ** 2).sum() * (np.abs(fb) ** 2).sum())
    from cryodask.physics import frequency_grid

    ky, kx = frequency_grid(a.shape, 1.0, layout="full", dtype=np.float64)  # cycles per pixel
    k = np.hypot(ky, kx)
    edges = np.asarray(edges_per_pixel, np.float64)
    return [float(cross[(k >= lo) & (k < hi)].sum() / norm) for lo, hi in zip(edges[:-1], edges[1:])]


def write_json(path, data) -> None:
    """Write a benchmark's results as indented JSON (no-op without a path)."""
    import json

    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)


def restore_as_pipeline(image, *, pixel_size_A: float = 1.0, defects=None, ctf=None):
    """What ``cryodask restore`` does to one micrograph: clean it, fit its CTF, Wiener.

    With ``ctf`` (a ``CTFParams``) that CTF is used instead of the fitted one. Returns the
    restored image (NaN-free) or None when no CTF could be fitted.
    """
    import warnings

    import numpy as np

    from cryodask.artifacts import clean_micrograph
    from cryodask.ctf import estimate_ctf
    from cryodask.physics import CTFParams
    from cryodask.restore import wiener_filter

    cleaned, _ = clean_micrograph(image, defects=defects)
    if ctf is not None:
        return wiener_filter(cleaned, ctf, pixel_size_A=pixel_size_A)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = estimate_ctf(cleaned, pixel_size_A=pixel_size_A)
    if not np.isfinite(fit.defocus_u_A):
        return None
    params = CTFParams(fit.defocus_u_A, fit.defocus_v_A, fit.defocus_angle_deg)
    return wiener_filter(cleaned, params, pixel_size_A=pixel_size_A)
