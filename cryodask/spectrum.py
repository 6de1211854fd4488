"""Power spectra of micrographs: pure array kernels (NumPy, CuPy, any array-API namespace).

Layout: every 2D spectrum here is in ``rfftn`` layout and FFT order, shape
``(n, n // 2 + 1)`` for tiles of ``n x n``; callers shift for display themselves.
"""

from __future__ import annotations

import math

import array_api_compat

from cryodask.physics import frequency_grid

__all__ = ["power_spectrum", "radial_average"]


def _hann(n: int, xp, dtype, device):
    i = xp.arange(n, dtype=dtype, device=device)
    return 0.5 - 0.5 * xp.cos((2.0 * math.pi / n) * i)


def power_spectrum(image, *, tile_size: int = 512, overlap: float = 0.5, window: bool = True):
    """Welch-averaged power spectrum of one micrograph.

    The image is cut into ``tile_size`` squares overlapping by ``overlap``; each tile has
    its mean removed, is tapered by a 2D Hann window (when ``window``), and the squared
    moduli of their real FFTs are averaged.

    Parameters
    ----------
    image : (ny, nx) array
        Float micrograph; ``ny, nx >= tile_size``.
    tile_size : int
        Even, >= 16.
    overlap : float
        In [0, 0.9].
    window : bool

    Returns
    -------
    (tile_size, tile_size // 2 + 1) array, float32 (or the input's float dtype)
        Power per Fourier pixel in ``rfftn`` layout, normalised so that a white noise of
        variance ``s2`` has a mean power of ``s2`` (whatever the window).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ps = power_spectrum(rng.normal(size=(256, 300)).astype(np.float32), tile_size=64)
    >>> ps.shape, ps.dtype, round(float(ps[1:, 1:].mean()), 1)
    ((64, 33), dtype('float32'), 1.0)
    """
    xp = array_api_compat.array_namespace(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2D (y, x), got shape {tuple(image.shape)}")
    if tile_size < 16 or tile_size % 2:
        raise ValueError(f"tile_size must be even and >= 16, got {tile_size!r}")
    if not 0.0 <= overlap <= 0.9:
        raise ValueError(f"overlap must be in [0, 0.9], got {overlap!r}")
    ny, nx = image.shape
    if min(ny, nx) < tile_size:
        raise ValueError(f"image of shape {(ny, nx)} is smaller than tile_size={tile_size}")
    dtype = image.dtype if xp.isdtype(image.dtype, "real floating") else xp.float32
    device = array_api_compat.device(image)
    image = xp.astype(image, dtype)
    step = max(1, int(round(tile_size * (1.0 - overlap))))
    ys = _starts(ny, tile_size, step)
    xs = _starts(nx, tile_size, step)
    if window:
        w1 = _hann(tile_size, xp, dtype, device)
        taper = w1[:, None] * w1[None, :]
        norm = float(xp.sum(taper * taper))
    else:
        taper = None
        norm = float(tile_size * tile_size)
    total = None
    for y0 in ys:
        row = image[y0 : y0 + tile_size, :]
        tiles = xp.stack([row[:, x0 : x0 + tile_size] for x0 in xs])
        tiles = tiles - xp.mean(tiles, axis=(1, 2), keepdims=True)
        if taper is not None:
            tiles = tiles * taper
        f = xp.fft.rfftn(tiles, axes=(1, 2))
        power = xp.sum(xp.real(f) ** 2 + xp.imag(f) ** 2, axis=0)
        total = power if total is None else total + power
    return xp.astype(total / (norm * len(ys) * len(xs)), dtype)


def _starts(n: int, tile: int, step: int) -> list[int]:
    starts = list(range(0, n - tile + 1, step))
    if starts[-1] != n - tile:
        starts.append(n - tile)  # cover the far edge too
    return starts


def radial_average(spectrum, pixel_size_A: float, *, n_bins: int | None = None):
    """Rotational average of an ``rfftn``-layout spectrum.

    Parameters
    ----------
    spectrum : (n, n // 2 + 1) array
    pixel_size_A : float
    n_bins : int, optional
        Default ``n // 2``: bins of width ``1 / (n * pixel_size_A)`` up to Nyquist.

    Returns
    -------
    k : (n_bins,) array
        Bin centres, 1/Å.
    profile : (n_bins,) array
        Mean of the spectrum in each bin (NaN for an empty bin).
    """
    xp = array_api_compat.array_namespace(spectrum)
    n = spectrum.shape[0]
    if spectrum.shape[1] != n // 2 + 1:
        raise ValueError(f"expected an rfftn-layout square spectrum, got shape {tuple(spectrum.shape)}")
    n_bins = n // 2 if n_bins is None else int(n_bins)
    device = array_api_compat.device(spectrum)
    ky, kx = frequency_grid((n, n), pixel_size_A, layout="rfft", xp=xp, dtype=spectrum.dtype,
                            device=device)
    k = xp.sqrt(ky * ky + kx * kx)
    nyquist = 0.5 / pixel_size_A
    index = xp.astype(xp.floor(k / nyquist * n_bins), xp.int64)
    index = xp.reshape(index, (-1,))
    values = xp.reshape(spectrum, (-1,))
    keep = index < n_bins
    index = index[keep]
    values = values[keep]
    # Bin by a one-hot matrix product: pure array-API, and cheap at spectrum sizes.
    bins = xp.arange(n_bins, device=device)
    sums = xp.zeros(n_bins, dtype=spectrum.dtype, device=device)
    counts = xp.zeros(n_bins, dtype=spectrum.dtype, device=device)
    chunk = 65536
    for start in range(0, index.shape[0], chunk):
        stop = min(start + chunk, index.shape[0])
        onehot = xp.astype(index[start:stop, None] == bins[None, :], spectrum.dtype)
        sums = sums + xp.sum(onehot * values[start:stop, None], axis=0)
        counts = counts + xp.sum(onehot, axis=0)
    centres = (xp.astype(bins, spectrum.dtype) + 0.5) * (nyquist / n_bins)
    profile = xp.where(counts > 0, sums / xp.where(counts > 0, counts, 1), xp.nan)
    return centres, profile
