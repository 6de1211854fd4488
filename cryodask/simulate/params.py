"""Parameters of the simulator's causal process, one frozen dataclass per level.

Every field carries its unit in its name. ``MicrographParams`` holds the nodes that vary
from micrograph to micrograph (dose, motion, coherence, aberrations, ice, sample,
artifacts); ``Detector`` holds what is fixed for a whole dataset (MTF, gain pattern,
defects, read noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cryodask.physics import CTFParams

__all__ = ["Detector", "MicrographParams"]

#: Inelastic mean free path of electrons in vitreous ice at 300 kV, Å (about 320 nm).
ICE_MEAN_FREE_PATH_A = 3200.0


def _check(name: str, value: float, low: float, high: float = math.inf) -> None:
    if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class Detector:
    """The detector node: fixed for every micrograph of a dataset.

    Attributes
    ----------
    mtf_power : float
        ``MTF(k) = [sinc(kx * a) * sinc(ky * a)] ** mtf_power`` (pixel-aperture MTF, 0.64 at
        Nyquist for ``mtf_power=1``); 0 gives a perfect detector.
    gain_std : float
        Standard deviation of the residual multiplicative gain pattern (0.02 = 2 %), half
        smooth, half pixel-to-pixel.
    n_dead_rows, n_dead_cols : int
        Rows and columns that read zero in every micrograph.
    n_stuck_pixels : int
        Pixels that read a high constant in every micrograph.
    read_noise_counts : float
        Standard deviation of additive Gaussian read noise, in counts.
    seed : int
        Draws the pattern and the defect positions.
    """

    mtf_power: float = 1.0
    gain_std: float = 0.0
    n_dead_rows: int = 0
    n_dead_cols: int = 0
    n_stuck_pixels: int = 0
    read_noise_counts: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check("mtf_power", self.mtf_power, 0.0, 10.0)
        _check("gain_std", self.gain_std, 0.0, 0.5)
        for name in ("n_dead_rows", "n_dead_cols", "n_stuck_pixels"):
            _check(name, getattr(self, name), 0)
        _check("read_noise_counts", self.read_noise_counts, 0.0)


@dataclass(frozen=True)
class MicrographParams:
    """Per-micrograph nodes of the causal process.

    Attributes
    ----------
    shape : (ny, nx)
    pixel_size_A : float
    voltage_kV, cs_mm, amplitude_contrast : float
        Optics.
    defocus_u_A, defocus_v_A, defocus_angle_deg, phase_shift_deg : float
        Aberrations, DESIGN.md's convention (normalised so that U >= V).
    dose_e_per_A2 : float
        Electrons per Å^2 in the exposure (shot noise and signal power).
    b_motion_A2, b_coherence_A2 : float
        Envelope B-factors of residual motion and of partial coherence.
    ice_thickness_A : float
        Mean ice thickness; drives the CTF-modulated structural noise (peak near 3.7 Å) and
        the smooth attenuation background.
    ice_gradient : float
        Fractional thickness change across the field (a wedge), >= 0.
    n_particles : int or None
        Particles in the field; ``None`` covers about ``particle_coverage`` of it.
    particle_coverage : float
        Fraction of the field covered by particles when ``n_particles`` is None.
    particle_radius_A : float
        Radius of the built-in phantom (ignored when atoms are given).
    atom_sigma_A : float
        Standard deviation of each Gaussian atom.
    contrast_per_atom_A2 : float
        Integrated projected contrast of one atom (twice its phase shift), Å^2.
    n_hot_pixels, n_xrays : int
        Impulse artifacts: isolated hot pixels and X-ray clusters.
    carbon_fraction : float
        Share of the field on the carbon support film (beyond a straight hole edge).
    carbon_thickness_A : float
        Thickness of the carbon film.
    vacuum_fraction : float
        Share of the field with no ice (a broken film).
    n_contamination : int
        Lenses of extra ice (crystals, drops) 2000-5000 Å thick.
    """

    shape: tuple[int, int] = (1024, 1024)
    pixel_size_A: float = 1.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    defocus_u_A: float = 15000.0
    defocus_v_A: float = 15000.0
    defocus_angle_deg: float = 0.0
    phase_shift_deg: float = 0.0
    dose_e_per_A2: float = 40.0
    b_motion_A2: float = 30.0
    b_coherence_A2: float = 20.0
    ice_thickness_A: float = 300.0
    ice_gradient: float = 0.1
    n_particles: int | None = None
    particle_coverage: float = 0.25
    particle_radius_A: float = 50.0
    atom_sigma_A: float = 1.0
    contrast_per_atom_A2: float = 0.07
    n_hot_pixels: int = 0
    n_xrays: int = 0
    carbon_fraction: float = 0.0
    carbon_thickness_A: float = 150.0
    vacuum_fraction: float = 0.0
    n_contamination: int = 0
    ctf: CTFParams = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 2 or min(shape) < 16:
            raise ValueError(f"shape must be (ny, nx) with both >= 16, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        _check("pixel_size_A", self.pixel_size_A, 0.05, 100.0)
        _check("dose_e_per_A2", self.dose_e_per_A2, 1e-3, 1e4)
        _check("b_motion_A2", self.b_motion_A2, 0.0, 5000.0)
        _check("b_coherence_A2", self.b_coherence_A2, 0.0, 5000.0)
        _check("ice_thickness_A", self.ice_thickness_A, 0.0, 10000.0)
        _check("ice_gradient", self.ice_gradient, 0.0, 1.0)
        _check("particle_coverage", self.particle_coverage, 0.0, 0.8)
        _check("particle_radius_A", self.particle_radius_A, 1.0, 2000.0)
        _check("atom_sigma_A", self.atom_sigma_A, 0.1, 20.0)
        _check("contrast_per_atom_A2", self.contrast_per_atom_A2, 0.0, 10.0)
        for name in ("n_hot_pixels", "n_xrays", "n_contamination"):
            _check(name, getattr(self, name), 0)
        _check("carbon_fraction", self.carbon_fraction, 0.0, 0.9)
        _check("carbon_thickness_A", self.carbon_thickness_A, 0.0, 2000.0)
        _check("vacuum_fraction", self.vacuum_fraction, 0.0, 0.5)
        if self.n_particles is not None:
            _check("n_particles", self.n_particles, 0)
        ctf = CTFParams(
            defocus_u_A=self.defocus_u_A,
            defocus_v_A=self.defocus_v_A,
            defocus_angle_deg=self.defocus_angle_deg,
            voltage_kV=self.voltage_kV,
            cs_mm=self.cs_mm,
            amplitude_contrast=self.amplitude_contrast,
            phase_shift_deg=self.phase_shift_deg,
            b_factor_A2=self.b_motion_A2 + self.b_coherence_A2,
        )
        object.__setattr__(self, "ctf", ctf)
        # Record the normalised astigmatism (U >= V) so that params and truth agree.
        object.__setattr__(self, "defocus_u_A", ctf.defocus_u_A)
        object.__setattr__(self, "defocus_v_A", ctf.defocus_v_A)
        object.__setattr__(self, "defocus_angle_deg", ctf.defocus_angle_deg)

    @property
    def dose_per_pixel(self) -> float:
        """Electrons per pixel."""
        return self.dose_e_per_A2 * self.pixel_size_A**2

    @property
    def particle_count(self) -> int:
        if self.n_particles is not None:
            return int(self.n_particles)
        area_A2 = self.shape[0] * self.shape[1] * self.pixel_size_A**2
        return int(round(self.particle_coverage * area_A2 / (math.pi * self.particle_radius_A**2)))
