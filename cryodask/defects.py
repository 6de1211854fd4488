"""Fixed detector defects and the residual gain pattern, from the statistics of a dataset.

Per micrograph (map) each pixel contributes its value over the micrograph's mean, whether
it was valid (not an impulse), whether it read (almost) nothing, and whether it was an
impulse; summed over the dataset (reduce) these give:

* the **defect map**: pixels that read nothing in most micrographs (dead), that are
  impulses in most micrographs (stuck/hot), or whose mean is far outside what counting
  noise allows; a row or column with most of its pixels defective is defective whole;
* the **gain estimate**: the mean normalised image, Wiener-filtered against the counting
  noise of that mean (its noise power is known from the doses), so that the estimate is
  not noisier than the pattern it corrects.

Also readers for a user's gain reference (MRC/TIFF, with MotionCor2's rotation and flip
options) and defect file (MotionCor2's ``x y width height`` rectangles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.fft

from cryodask.artifacts import HOT_PIXEL, XRAY
from cryodask.backend import namespace

__all__ = [
    "N_STATISTICS",
    "DatasetDefects",
    "estimate_defects",
    "micrograph_statistics",
    "read_defect_file",
    "read_gain_reference",
]

#: Layers of :func:`micrograph_statistics`: normalised value, valid, low, impulse.
N_STATISTICS = 4


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
    x = xp.astype(image, xp.float32)
    impulse = (mask == HOT_PIXEL) | (mask == XRAY)
    valid = ~impulse
    mean = float(xp.sum(xp.where(valid, x, xp.zeros_like(x))) / max(float(xp.sum(xp.astype(valid, xp.float32))), 1.0))
    if not mean > 0:
        mean = 1.0
    norm = xp.where(valid, x / mean, xp.zeros_like(x))
    low = xp.astype(x < 0.05 * mean, xp.float32)
    return xp.stack([norm, xp.astype(valid, xp.float32), low, xp.astype(impulse, xp.float32)])


@dataclass(frozen=True)
class DatasetDefects:
    """Defects and gain found across a dataset."""

    defects: np.ndarray  # (ny, nx) bool
    gain: np.ndarray  # (ny, nx) float32, mean 1; divide images by it
    raw_gain: np.ndarray  # (ny, nx) float32, the unfiltered mean normalised image
    n_micrographs: int
    dead_rows: tuple
    dead_columns: tuple


def estimate_defects(sums, n_micrographs: int, *, mean_counts: float | None = None,
                     fano: float = 1.0, min_micrographs: int = 4) -> DatasetDefects:
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
    gain = _wiener(filled - 1.0, noise_var / centre**2) + 1.0
    return DatasetDefects(defects=defects, gain=gain.astype(np.float32), raw_gain=raw.astype(np.float32),
                          n_micrographs=int(n_micrographs), dead_rows=rows, dead_columns=cols)


def _white_noise_power(pattern):
    """Per-pixel variance of the white part of a pattern, from its outer Fourier shell."""
    f = scipy.fft.rfft2(pattern - pattern.mean())
    power = (np.abs(f) ** 2) / pattern.size
    ky = np.abs(np.fft.fftfreq(pattern.shape[0]))[:, None]
    kx = np.fft.rfftfreq(pattern.shape[1])[None, :]
    return float(np.median(power[np.hypot(ky, kx) > 0.4]))


def _wiener(pattern, noise_var):
    """Wiener-filter a pattern against white noise of known per-pixel variance.

    The pattern's power spectrum, averaged in rings, minus the noise power gives the
    signal power; each Fourier coefficient is scaled by ``S / (S + N)``.
    """
    f = scipy.fft.rfft2(pattern)
    power = (np.abs(f) ** 2) / pattern.size
    ky = np.fft.fftfreq(pattern.shape[0])[:, None]
    kx = np.fft.rfftfreq(pattern.shape[1])[None, :]
    k = np.hypot(ky, kx)
    bins = np.minimum((k / 0.5 * 64).astype(int), 64)
    counts = np.bincount(bins.ravel(), minlength=65)
    ring = np.bincount(bins.ravel(), weights=power.ravel(), minlength=65) / np.maximum(counts, 1)
    signal = np.maximum(ring - noise_var, 0.0)
    gain = signal / (signal + noise_var)
    return scipy.fft.irfft2(f * gain[bins], s=pattern.shape)


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

