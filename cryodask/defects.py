"""Fixed detector defects and the residual gain pattern, from the statistics of a dataset.

Per micrograph (map) each pixel contributes its value over the micrograph's mean, whether
it was valid (not an impulse), whether it read (almost) nothing, and whether it was an
impulse; summed over the dataset (reduce) these give:

* the **defect map**: pixels that read nothing in most micrographs (dead), that are
  impulses in most micrographs (stuck/hot), or whose mean is far outside what counting
  noise allows; a row or column with most of its pixels defective is defective whole;
* the **gain estimate**: the mean normalised image, Wiener-filtered against the noise of
  that mean, so that the estimate is not noisier than the pattern it corrects. The noise
  is what varies from micrograph to micrograph -- counting noise, and at low frequencies
  mostly the specimen and the ice's thickness -- measured per ring of the spectrum from
  each micrograph's own power (:func:`ring_power`, summed) against the mean's; with only
  the counting noise (known from the doses) the filter kept the specimens' low-frequency
  residue as pattern, and dividing by it imprinted that residue on every micrograph.

Also readers for a user's gain reference (MRC/TIFF, with MotionCor2's rotation and flip
options) and defect file (MotionCor2's ``x y width height`` rectangles).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from cryodask.artifacts import HOT_PIXEL, XRAY
from cryodask.backend import namespace

__all__ = [
    "N_STATISTICS",
    "DatasetDefects",
    "estimate_defects",
    "micrograph_statistics",
    "ring_power",
    "read_defect_file",
    "read_gain_reference",
]

#: Layers of :func:`micrograph_statistics`: normalised value, valid, low, impulse.
N_STATISTICS = 4
#: Rings of the gain estimate's Wiener filter, 0 to Nyquist (the last holds the corners).
N_GAIN_RINGS = 65


@functools.lru_cache(maxsize=4)
def _ring_index(shape):
    """Each ``rfft2`` pixel's ring (uint8, flat) and the rings' pixel counts, per shape."""
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    bins = np.minimum((np.hypot(ky, kx) / 0.5 * (N_GAIN_RINGS - 1)).astype(np.uint8), N_GAIN_RINGS - 1).ravel()
    return bins, np.bincount(bins, minlength=N_GAIN_RINGS)


def _ring_mean(power, shape):
    bins, counts = _ring_index(tuple(shape))
    return np.bincount(bins, np.asarray(power).ravel(), N_GAIN_RINGS) / np.maximum(counts, 1)


def ring_power(statistics):
    """A micrograph's normalised image (value over mean less 1, impulses 0) as power per
    Fourier pixel in the gain filter's rings, from its :func:`micrograph_statistics`; to be
    summed over a dataset (:func:`estimate_defects`' ``ring_power``).

    Returns
    -------
    (N_GAIN_RINGS,) float64 array
    """
    statistics = np.asarray(statistics)
    x = statistics[0] - statistics[1]
    f = scipy.fft.rfft2(x)
    return _ring_mean(f.real**2 + f.imag**2, x.shape) / x.size


def micrograph_statistics(image, mask):
    """Per-pixel statistics of one micrograph, to be summed over a dataset.

    Parameters
    ----------
    image : (ny, nx) array
    mask : (ny, nx) uint8
        Impulse codes of :mod:`cryodask.artifacts` for this micrograph.

    Returns
    -------
    (4, ny, nx) float32 array
        ``[value / mean or 0, valid, low, impulse]`` where ``valid`` is 1 for pixels that
        are not impulses, ``low`` is 1 where the pixel reads below 5 % of the mean and
        ``impulse`` is 1 for hot pixels and X-rays.
    """
    xp = namespace(image)
    x = xp.astype(image, xp.float32, copy=False)
    impulse = (mask == HOT_PIXEL) | (mask == XRAY)
    # Each plane written in place (stacked, four temporaries were copied once more); the
    # impulses are few, so they are zeroed by index rather than by a whole-image select.
    out = xp.empty((N_STATISTICS, *x.shape), dtype=xp.float32)
    out[0, ...] = x
    out[0, ...][impulse] = 0.0
    n_valid = x.shape[0] * x.shape[1] - int(xp.count_nonzero(impulse))
    mean = float(xp.sum(out[0, ...])) / max(float(n_valid), 1.0)
    if not mean > 0:
        mean = 1.0
    out[0, ...] /= mean
    out[3, ...] = xp.astype(impulse, xp.float32)
    out[1, ...] = 1.0 - out[3, ...]
    out[2, ...] = xp.astype(x < 0.05 * mean, xp.float32)
    return out


@dataclass(frozen=True)
class DatasetDefects:
    """Defects and gain found across a dataset."""

    defects: np.ndarray  # (ny, nx) bool
    gain: np.ndarray  # (ny, nx) float32, mean 1; divide images by it
    raw_gain: np.ndarray  # (ny, nx) float32, the unfiltered mean normalised image
    n_micrographs: int
    dead_rows: tuple
    dead_columns: tuple
    #: Per ring of :data:`N_GAIN_RINGS` (ring ``j`` centred on ``(j + 0.5) / 128`` cycles per
    #: pixel), per Fourier pixel of a unit-mean image: the pattern's power the filter found,
    #: and the power of the estimate's error (``S·N / (S + N)``), which dividing by it
    #: leaves in every micrograph. Empty when not measured.
    gain_pattern_power: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gain_error_power: np.ndarray = field(default_factory=lambda: np.zeros(0))


def estimate_defects(sums, n_micrographs: int, *, mean_counts: float | None = None,
                     fano: float = 1.0, min_micrographs: int = 4, ring_power=None) -> DatasetDefects:
    """Defect map and gain estimate from summed :func:`micrograph_statistics`.

    Parameters
    ----------
    sums : (4, ny, nx) array
        The statistics summed over ``n_micrographs`` micrographs.
    n_micrographs : int
        At least ``min_micrographs``.
    mean_counts : float, optional
        Mean counts per pixel per micrograph; with ``fano`` it gives the noise of the mean
        normalised image (``fano / (n * mean_counts)`` per pixel). Without it the noise is
        measured from the pattern's high-frequency power.
    ring_power : (N_GAIN_RINGS,) array, optional
        :func:`ring_power` summed over the same micrographs: the noise of their mean is then
        measured per ring, as what varies between them (at least the counting noise).

    Returns
    -------
    DatasetDefects
    """
    if n_micrographs < min_micrographs:
        raise ValueError(f"need at least {min_micrographs} micrographs to find fixed defects, "
                         f"got {n_micrographs}")
    sums = np.asarray(sums, dtype=np.float64)
    norm, valid, low, impulse = sums
    n = float(n_micrographs)
    dead = low / n > 0.5
    stuck = impulse / n > 0.5
    raw = np.where(valid > 0, norm / np.maximum(valid, 1.0), 1.0)
    if mean_counts is not None and mean_counts > 0:
        noise_var = fano / (n * mean_counts)
    else:
        noise_var = _white_noise_power(raw)
    noise_sd = np.sqrt(noise_var)
    centre = np.median(raw[~(dead | stuck)])
    outlier = np.abs(raw - centre) > max(12.0 * noise_sd, 0.3 * centre)
    defects = dead | stuck | outlier
    rows = tuple(int(i) for i in np.flatnonzero(defects.mean(axis=1) > 0.5))
    cols = tuple(int(j) for j in np.flatnonzero(defects.mean(axis=0) > 0.5))
    defects[list(rows), :] = True
    defects[:, list(cols)] = True
    filled = np.where(defects, centre, raw) / centre
    pattern = filled - 1.0
    noise = np.full(N_GAIN_RINGS, noise_var / centre**2)
    if ring_power is not None and n_micrographs > 1:
        # Per pixel frequency, E|F_i|² = |G|² + σ² and E|F_mean|² = |G|² + σ²/n: the noise of
        # the mean is (mean_i |F_i|² - |F_mean|²) / (n - 1), averaged in each ring.
        # (With the defects as read, as each micrograph's power has them.)
        _, mean_power = _ring_average(raw / centre - 1.0)
        spread = (np.asarray(ring_power, np.float64) / n - mean_power) / (n - 1.0)
        noise = np.maximum(noise, spread)
    filtered, signal = _wiener(pattern, noise)
    error = signal * noise / np.maximum(signal + noise, 1e-30)
    return DatasetDefects(defects=defects, gain=(filtered + 1.0).astype(np.float32), raw_gain=raw.astype(np.float32),
                          n_micrographs=int(n_micrographs), dead_rows=rows, dead_columns=cols,
                          gain_pattern_power=signal, gain_error_power=error)


def _white_noise_power(pattern):
    """Per-pixel variance of the white part of a pattern, from its outer Fourier shell."""
    f = scipy.fft.rfft2(pattern - pattern.mean())
    power = (np.abs(f) ** 2) / pattern.size
    ky = np.abs(np.fft.fftfreq(pattern.shape[0]))[:, None]
    kx = np.fft.rfftfreq(pattern.shape[1])[None, :]
    return float(np.median(power[np.hypot(ky, kx) > 0.4]))


def _ring_average(pattern):
    f = scipy.fft.rfft2(pattern)
    return f, _ring_mean((f.real**2 + f.imag**2) / pattern.size, pattern.shape)


def _wiener(pattern, noise_var):
    """Wiener-filter a pattern against noise of known power per Fourier pixel (a number:
    white; or one per ring of :data:`N_GAIN_RINGS`).

    The pattern's power spectrum, averaged in rings, minus the noise power gives the
    signal power; each Fourier coefficient is scaled by ``S / (S + N)``. Returns the
    filtered pattern and ``S`` per ring.
    """
    f, ring = _ring_average(pattern)
    noise = np.broadcast_to(np.asarray(noise_var, np.float64), ring.shape)
    signal = np.maximum(ring - noise, 0.0)
    gain = signal / np.maximum(signal + noise, 1e-30)
    bins, _ = _ring_index(pattern.shape)
    return scipy.fft.irfft2(f * gain[bins].reshape(f.shape), s=pattern.shape), signal


def read_gain_reference(path, *, rotate: int = 0, flip: int = 0, shape=None) -> np.ndarray:
    """A gain reference (MRC or TIFF) as float32, oriented like the micrographs.

    Parameters
    ----------
    path : str
    rotate : {0, 1, 2, 3}
        Quarter turns from +x towards +y (MotionCor2's ``-RotGain``; RELION's
        ``--gain_rot``).
    flip : {0, 1, 2}
        After rotating: 1 flips rows (upside down), 2 flips columns (left-right), as
        MotionCor2's ``-FlipGain`` and RELION's ``--gain_flip``.
    shape : (ny, nx), optional
        The micrographs' shape; a mismatch is an error naming both.

    Notes
    -----
    MotionCor2 multiplies frames by the gain reference; cryodask does the same with it.
    """
    from cryodask.io.images import MicrographFileError, probe, read_micrograph

    if rotate not in (0, 1, 2, 3):
        raise ValueError(f"rotate must be 0, 1, 2 or 3 quarter turns, got {rotate!r}")
    if flip not in (0, 1, 2):
        raise ValueError(f"flip must be 0 (none), 1 (upside down) or 2 (left-right), got {flip!r}")
    header = probe(str(path))
    if header.n_sections != 1:
        raise MicrographFileError(f"{path}: a gain reference must be one image, it has {header.n_sections}")
    gain = read_micrograph(str(path)).astype(np.float32)
    gain = np.rot90(gain, -rotate)  # numpy turns from +y towards +x; ours from +x towards +y
    if flip == 1:
        gain = gain[::-1, :]
    elif flip == 2:
        gain = gain[:, ::-1]
    gain = np.ascontiguousarray(gain)
    if shape is not None and tuple(gain.shape) != tuple(shape):
        raise MicrographFileError(f"{path}: gain reference is {gain.shape[0]}x{gain.shape[1]} after "
                                  f"rotate={rotate}, flip={flip}; the micrographs are {shape[0]}x{shape[1]}")
    if not np.all(np.isfinite(gain)) or float(gain.min()) < 0:
        raise MicrographFileError(f"{path}: gain reference values must be finite and >= 0")
    return gain


def read_defect_file(path, shape) -> np.ndarray:
    """A MotionCor2-style defect file: one ``x y width height`` rectangle per line.

    ``x`` is the first column and ``y`` the first row of the rectangle (0-based).

    Returns
    -------
    (ny, nx) bool array
    """
    path = os.fspath(path)
    defects = np.zeros(shape, dtype=bool)
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                x, y, w, h = (int(float(v)) for v in text.split()[:4])
            except ValueError:
                raise ValueError(f"{path}, line {number}: expected 'x y width height', got {line.strip()!r}") from None
            if w < 1 or h < 1 or x < 0 or y < 0 or x >= shape[1] or y >= shape[0]:
                raise ValueError(f"{path}, line {number}: rectangle {x} {y} {w} {h} is outside the "
                                 f"{shape[1]}x{shape[0]} image or empty")
            defects[y : y + h, x : x + w] = True
    return defects

