"""One micrograph through the causal process of DESIGN.md, with the truth of every node.

The forward model, in the order it is applied::

    p(r)      projected contrast of the particles (CTF-free; protein positive)
    n_ice(r)  amorphous-ice structural contrast, power peaking near 1/3.66 Å^-1, ∝ thickness
    c(r)      = F^-1[ (F p + F n_ice) · CTF(k) · E(k) ]           aberrations, motion, coherence
    a(r)      = exp(-t(r) / λ_mfp)                                  ice thickness background
    λ(r)      = dose_px · F^-1[ F(a · (1 + c)) · MTF(k) ]           detector MTF (counting)
    counts    ~ Poisson(λ)                                          shot noise
    image     = counts · g(r) + read noise, then defects, hot pixels and X-rays

The noise each cause contributes is recorded as a variance in the image's units (counts^2):
``dose`` (shot noise), ``ice`` (structural noise plus thickness background), ``detector``
(gain pattern, read noise, defects) and ``artifacts`` (hot pixels and X-rays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import special
from scipy.spatial.transform import Rotation

from cryodask import artifacts
from cryodask.regions import CARBON, VACUUM
from cryodask.physics import ctf_2d, frequency_grid
from cryodask.simulate.params import ICE_MEAN_FREE_PATH_A, Detector, MicrographParams
from cryodask.simulate.phantom import gaussian_phantom, splat_projections
from cryodask.simulate.regions import CARBON_ATOMS_PER_A3, CARBON_MEAN_FREE_PATH_A, draw_regions

__all__ = [
    "DetectorState",
    "SimulatedMicrograph",
    "detector_state",
    "ice_power_spectrum",
    "simulate_micrograph",
]

#: Position of the amorphous-ice diffraction ring, Å.
ICE_RING_A = 3.66
#: Water molecules per Å^3 in vitreous ice (density 0.93 g/cm^3).
ICE_MOLECULES_PER_A3 = 0.031
_ICE_RING_WIDTH = 0.025  # 1/Å, standard deviation of the first peak of S(k)


@dataclass(frozen=True)
class DetectorState:
    """A realised detector: what is fixed across a dataset of a given image shape."""

    gain: np.ndarray  # (ny, nx) float32, mean 1
    defects: np.ndarray  # (ny, nx) bool: dead rows/columns and stuck pixels
    dead: np.ndarray  # (ny, nx) bool: reads zero
    stuck: np.ndarray  # (ny, nx) bool: reads a high constant
    detector: Detector


@dataclass
class SimulatedMicrograph:
    """A simulated micrograph and the ground truth of every node.

    Attributes
    ----------
    image : (ny, nx) float32
        What the detector writes (counts per pixel, gain normalised).
    projection : (ny, nx) float32
        The CTF-free projected contrast of the particles (protein positive, dimensionless).
    clean : (ny, nx) float32
        The particles' contrast after the CTF and envelope: ``F^-1[F(projection)·CTF·E]``.
    expected : (ny, nx) float32
        The noise-free expected counts ``λ(r)`` before gain, defects and artifacts.
    mask : (ny, nx) uint8
        Artifact codes of :mod:`cryodask.artifacts`.
    params : MicrographParams
    noise_variance : dict of str to float
        Variance each cause adds to the image (counts^2): ``dose``, ``ice``, ``detector``,
        ``artifacts``; and their parts ``ice_structure``, ``ice_background``, ``gain``,
        ``read_noise``, ``defects``, ``hot_pixels``, ``xrays``.
    signal_variance : float
        Variance of the particles' signal in the image (counts^2).
    particle_centres_px : (n, 2) float array of ``(y, x)``
    regions : (ny, nx) uint8
        Region codes of :mod:`cryodask.regions` (ice, vacuum, carbon, contamination).
    """

    image: np.ndarray
    projection: np.ndarray
    clean: np.ndarray
    expected: np.ndarray
    mask: np.ndarray
    params: MicrographParams
    noise_variance: dict = field(default_factory=dict)
    signal_variance: float = 0.0
    particle_centres_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    regions: np.ndarray | None = None


def detector_state(detector: Detector, shape: tuple[int, int]) -> DetectorState:
    """Realise a detector's gain pattern and defects for images of ``shape``."""
    ny, nx = shape
    rng = np.random.default_rng([detector.seed, 7919])
    gain = np.ones(shape, dtype=np.float64)
    if detector.gain_std > 0:
        white = rng.normal(size=shape)
        smooth = _smooth_field(rng, shape, correlation_px=max(ny, nx) / 16)
        pattern = np.sqrt(0.5) * white + np.sqrt(0.5) * smooth
        gain += detector.gain_std * pattern / pattern.std()
    dead = np.zeros(shape, dtype=bool)
    dead[rng.choice(ny, size=min(detector.n_dead_rows, ny), replace=False), :] = True
    dead[:, rng.choice(nx, size=min(detector.n_dead_cols, nx), replace=False)] = True
    stuck = np.zeros(ny * nx, dtype=bool)
    stuck[rng.choice(ny * nx, size=min(detector.n_stuck_pixels, ny * nx), replace=False)] = True
    stuck = stuck.reshape(shape) & ~dead
    return DetectorState(gain=gain.astype(np.float32), defects=dead | stuck, dead=dead,
                         stuck=stuck, detector=detector)


def ice_power_spectrum(k, thickness_A: float, contrast_per_molecule_A2: float = 0.07):
    """Power spectrum of amorphous-ice structural contrast, Å^2, at frequency ``k`` (1/Å).

    ``P(k) = w^2 * n * t * S(k)``: molecules of integrated contrast ``w`` at number density
    ``n`` (:data:`ICE_MOLECULES_PER_A3`) in a slab of thickness ``t``, with the structure
    factor ``S(k)`` of low-density amorphous ice: about 0.05 as k -> 0 (low
    compressibility), rising towards a first peak of height ~2.4 at 1/3.66 Å^-1.
    """
    k0 = 1.0 / ICE_RING_A
    x = (k / k0) ** 2
    structure = 0.05 + 0.35 * x * np.exp(1.0 - x) + 2.0 * np.exp(-0.5 * ((k - k0) / _ICE_RING_WIDTH) ** 2)
    return contrast_per_molecule_A2**2 * ICE_MOLECULES_PER_A3 * thickness_A * structure


def simulate_micrograph(params: MicrographParams, *, detector: Detector | DetectorState | None = None,
                        atoms: np.ndarray | None = None, seed: int = 0,
                        paired_counts: bool = False) -> SimulatedMicrograph:
    """Simulate one micrograph and record the truth of every node.

    Parameters
    ----------
    params : MicrographParams
        The per-micrograph nodes.
    detector : Detector or DetectorState, optional
        The dataset's detector; default a perfect-gain detector with pixel-aperture MTF.
        Pass a :class:`DetectorState` to share one realisation across many micrographs.
    atoms : (n_atoms, 3) array, optional
        The particle's atoms in Å; default :func:`gaussian_phantom` of ``particle_radius_A``.
    seed : int
        Everything random (orientations, positions, noise, artifacts) is drawn from it.
    paired_counts : bool
        Draw each pixel's count as the Poisson quantile of one uniform number (inverse
        transform) instead of by rejection. The counts are Poisson either way; paired, two
        simulations of one seed whose expected counts differ (the same micrograph without
        its ice, say) share the noise realisation wherever they can, so the difference of
        their results is the change's effect and not a second draw of the noise (common
        random numbers). About 1 µs per pixel.

    Returns
    -------
    SimulatedMicrograph

    Examples
    --------
    >>> from cryodask.simulate import MicrographParams, simulate_micrograph
    >>> sim = simulate_micrograph(MicrographParams(shape=(128, 160), n_particles=2), seed=1)
    >>> sim.image.shape, sim.image.dtype
    ((128, 160), dtype('float32'))
    """
    if detector is None:
        detector = Detector()
    state = detector if isinstance(detector, DetectorState) else detector_state(detector, params.shape)
    if state.gain.shape != params.shape:
        raise ValueError(
            f"detector state is for shape {state.gain.shape}, micrograph is {params.shape}"
        )
    rng = np.random.default_rng([seed, 104729])
    shape = params.shape
    a_px = params.pixel_size_A
    if atoms is None:
        atoms = gaussian_phantom(radius_A=params.particle_radius_A)
    radius_px = float(np.sqrt((atoms.astype(np.float64) ** 2).sum(1).max())) / a_px

    geometry = draw_regions(shape, carbon_fraction=params.carbon_fraction,
                            vacuum_fraction=params.vacuum_fraction,
                            n_contamination=params.n_contamination, seed=seed)
    # Sample: particles at random orientations and non-overlapping positions, in the ice.
    centres = _place_particles(rng, shape, params.particle_count, radius_px)
    rotations = Rotation.random(max(len(centres), 1), rng)[: len(centres)]
    if geometry.any and len(centres):
        where = np.round(centres).astype(int)
        keep = geometry.codes[np.clip(where[:, 0], 0, shape[0] - 1), np.clip(where[:, 1], 0, shape[1] - 1)] != VACUUM
        centres, rotations = centres[keep], (rotations[keep] if keep.any() else rotations[:0])
    density = splat_projections(atoms, centres, rotations, shape, a_px)

    ky, kx = frequency_grid(shape, a_px, layout="rfft", dtype=np.float64)
    k2 = ky**2 + kx**2
    k = np.sqrt(k2)
    atom_ft = params.contrast_per_atom_A2 / a_px**2 * np.exp(-2.0 * np.pi**2 * params.atom_sigma_A**2 * k2)
    proj_ft = np.fft.rfft2(density) * atom_ft

    # Ice: CTF-modulated structural noise of the given power spectrum.
    cell_A2 = 1.0 / (shape[0] * shape[1] * a_px**2)
    ice_amp = np.sqrt(ice_power_spectrum(k, params.ice_thickness_A, params.contrast_per_atom_A2) * cell_A2) * np.sqrt(shape[0] * shape[1])
    ice_ft = np.fft.rfft2(rng.normal(size=shape)) * ice_amp

    thickness = params.ice_thickness_A * (1.0 + params.ice_gradient * _wedge(rng, shape)
                                          + 0.02 * _smooth_field(rng, shape, max(shape) / 8))
    thickness = np.clip(thickness, 0.0, None)
    ctf = ctf_2d(ky, kx, params.ctf)  # includes the motion + coherence envelope
    projection = np.fft.irfft2(proj_ft, s=shape)
    clean = np.fft.irfft2(proj_ft * ctf, s=shape)
    optical_depth = thickness / ICE_MEAN_FREE_PATH_A
    if geometry.any:
        # Ice noise follows the local thickness; carbon adds its own structure and depth.
        thickness = np.where(geometry.codes == VACUUM, 0.0, thickness) + geometry.extra_thickness_A
        scale = np.sqrt(thickness / params.ice_thickness_A) if params.ice_thickness_A > 0 else 0.0
        specimen = np.fft.irfft2(ice_ft, s=shape) * scale
        on_carbon = geometry.codes == CARBON
        if on_carbon.any() and params.carbon_thickness_A > 0:
            carbon_rng = np.random.default_rng([seed, 271828])
            carbon_power = (params.contrast_per_atom_A2**2 * CARBON_ATOMS_PER_A3 * params.carbon_thickness_A
                            * (1.0 - 0.7 * np.exp(-((k / 0.1) ** 2))))
            carbon_amp = np.sqrt(carbon_power * cell_A2) * np.sqrt(shape[0] * shape[1])
            carbon = np.fft.irfft2(np.fft.rfft2(carbon_rng.normal(size=shape)) * carbon_amp, s=shape)
            specimen = specimen + carbon * on_carbon
        ice_contrast = np.fft.irfft2(np.fft.rfft2(specimen) * ctf, s=shape)
        optical_depth = thickness / ICE_MEAN_FREE_PATH_A + on_carbon * (
            params.carbon_thickness_A / CARBON_MEAN_FREE_PATH_A)
    else:
        ice_contrast = np.fft.irfft2(ice_ft * ctf, s=shape)
    attenuation = np.exp(-optical_depth)

    mtf = _mtf(ky, kx, a_px, state.detector.mtf_power)
    dose_px = params.dose_per_pixel

    def detect(x):
        return dose_px * np.fft.irfft2(np.fft.rfft2(x) * mtf, s=shape)

    background = detect(attenuation)
    signal = detect(attenuation * clean)
    ice_signal = detect(attenuation * ice_contrast)
    expected = np.clip(background + signal + ice_signal, 0.0, None)

    if paired_counts:
        counts = np.maximum(np.ceil(special.pdtrik(rng.random(shape), expected)), 0.0)
    else:
        counts = rng.poisson(expected).astype(np.float64)
    shot_var = float(expected.mean())
    image = counts * state.gain
    gain_var = float(((counts * (state.gain - 1.0)) ** 2).mean())
    read_var = 0.0
    if state.detector.read_noise_counts > 0:
        read = rng.normal(scale=state.detector.read_noise_counts, size=shape)
        image += read
        read_var = float(read.var())

    mask = np.zeros(shape, dtype=np.uint8)
    before = image.copy()
    mean_counts = float(expected.mean())
    sigma_counts = float(np.sqrt(max(mean_counts, 1.0)))
    image[state.dead] = 0.0
    image[state.stuck] = mean_counts + 40.0 * sigma_counts
    mask[state.defects] = artifacts.DEFECT
    defect_var = float(((image - before) ** 2).mean())

    before = image.copy()
    _add_hot_pixels(rng, image, mask, params.n_hot_pixels, mean_counts, sigma_counts)
    hot_var = float(((image - before) ** 2).mean())
    before = image.copy()
    _add_xrays(rng, image, mask, params.n_xrays, sigma_counts)
    xray_var = float(((image - before) ** 2).mean())

    ice_structure_var = float(ice_signal.var())
    ice_background_var = float(background.var())
    noise = {
        "dose": shot_var,
        "ice": ice_structure_var + ice_background_var,
        "detector": gain_var + read_var + defect_var,
        "artifacts": hot_var + xray_var,
        "ice_structure": ice_structure_var,
        "ice_background": ice_background_var,
        "gain": gain_var,
        "read_noise": read_var,
        "defects": defect_var,
        "hot_pixels": hot_var,
        "xrays": xray_var,
    }
    return SimulatedMicrograph(
        image=image.astype(np.float32),
        projection=projection.astype(np.float32),
        clean=clean.astype(np.float32),
        expected=expected.astype(np.float32),
        mask=mask,
        params=params,
        noise_variance=noise,
        signal_variance=float(signal.var()),
        particle_centres_px=centres,
        regions=geometry.codes,
    )


def _mtf(ky, kx, pixel_size_A: float, power: float):
    if power == 0:
        return np.ones(np.broadcast_shapes(ky.shape, kx.shape))
    return (np.sinc(ky * pixel_size_A) * np.sinc(kx * pixel_size_A)) ** power


def _place_particles(rng, shape, n, radius_px):
    """Up to ``n`` centres ``(y, x)`` at least two radii apart and one radius from the edge."""
    ny, nx = shape
    margin = min(radius_px, 0.25 * min(ny, nx))
    centres: list[tuple[float, float]] = []
    for _ in range(50 * max(n, 1)):
        if len(centres) >= n:
            break
        c = (rng.uniform(margin, ny - margin), rng.uniform(margin, nx - margin))
        if all((c[0] - y) ** 2 + (c[1] - x) ** 2 >= (2 * radius_px) ** 2 for y, x in centres):
            centres.append(c)
    return np.asarray(centres, dtype=np.float64).reshape(-1, 2)


def _wedge(rng, shape):
    """A linear ramp in a random direction, spanning [-0.5, 0.5] across the field."""
    ny, nx = shape
    theta = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:ny, 0:nx]
    ramp = np.cos(theta) * x / nx + np.sin(theta) * y / ny
    return ramp - 0.5 * (ramp.max() + ramp.min())


def _smooth_field(rng, shape, correlation_px):
    """Unit-variance Gaussian random field with a Gaussian correlation of the given length."""
    ky, kx = frequency_grid(shape, 1.0, layout="rfft", dtype=np.float64)
    filt = np.exp(-2.0 * np.pi**2 * correlation_px**2 * (ky**2 + kx**2))
    field_ = np.fft.irfft2(np.fft.rfft2(rng.normal(size=shape)) * filt, s=shape)
    return field_ / max(field_.std(), 1e-12)


def _add_hot_pixels(rng, image, mask, n, mean_counts, sigma_counts):
    free = np.flatnonzero(mask.ravel() == artifacts.GOOD)
    idx = rng.choice(free, size=min(n, free.size), replace=False)
    image.ravel()[idx] = mean_counts + sigma_counts * rng.uniform(10.0, 60.0, size=idx.size)
    mask.ravel()[idx] = artifacts.HOT_PIXEL


def _add_xrays(rng, image, mask, n, sigma_counts):
    ny, nx = image.shape
    for _ in range(n):
        size = int(rng.integers(3, 25))
        pixels = [(int(rng.integers(2, ny - 2)), int(rng.integers(2, nx - 2)))]
        while len(pixels) < size:
            y, x = pixels[int(rng.integers(len(pixels)))]
            dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[int(rng.integers(4))]
            p = (min(max(y + dy, 0), ny - 1), min(max(x + dx, 0), nx - 1))
            if p not in pixels:
                pixels.append(p)
        ys, xs = np.array(pixels).T
        # A track deposits energy in every pixel it crosses: all well above the noise.
        peak = sigma_counts * rng.uniform(30.0, 300.0)
        image[ys, xs] += peak * rng.uniform(0.3, 1.0, size=len(pixels))
        mask[ys, xs] = np.where(mask[ys, xs] == artifacts.DEFECT, artifacts.DEFECT, artifacts.XRAY)
