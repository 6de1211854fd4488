"""Where a simulated micrograph is ice, vacuum, carbon or contamination.

The region codes are those of :mod:`cryodask.regions`. The geometry is drawn from its own
random stream, so adding regions does not change the rest of a micrograph's draws.
"""

from __future__ import annotations

import numpy as np

from cryodask.regions import CARBON, CONTAMINATION, ICE, VACUUM

__all__ = ["CARBON_ATOMS_PER_A3", "CARBON_MEAN_FREE_PATH_A", "RegionGeometry", "draw_regions"]

#: Atoms per Å^3 in amorphous carbon film (density about 2 g/cm^3).
CARBON_ATOMS_PER_A3 = 0.10
#: Inelastic mean free path of 300 kV electrons in amorphous carbon, Å (about 180 nm).
CARBON_MEAN_FREE_PATH_A = 1800.0


class RegionGeometry:
    """A realised region layout: the code map and the extra thickness of contamination."""

    def __init__(self, codes: np.ndarray, extra_thickness_A: np.ndarray):
        self.codes = codes
        self.extra_thickness_A = extra_thickness_A

    @property
    def any(self) -> bool:
        return bool((self.codes != ICE).any())


def draw_regions(shape, *, carbon_fraction: float, vacuum_fraction: float, n_contamination: int,
                 seed: int) -> RegionGeometry:
    """Draw a layout: a carbon edge, a vacuum patch and contamination blobs.

    * Carbon covers ``carbon_fraction`` of the field beyond a straight edge (the rim of a
      hole, whose curvature is negligible over one micrograph) at a random angle.
    * Vacuum is a roughly round patch of ``vacuum_fraction`` of the field where the ice
      is missing (a broken film), on the ice side of the carbon edge.
    * Each contamination blob is a lens of extra ice (an ice crystal or a drop), 2000-5000
      Å thick at its centre, of radius 4-12 % of the field; its region is where it adds
      more than 500 Å.
    """
    ny, nx = shape
    rng = np.random.default_rng([seed, 31337])
    codes = np.full(shape, ICE, dtype=np.uint8)
    extra = np.zeros(shape, dtype=np.float64)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    y -= ny / 2.0
    x -= nx / 2.0
    if carbon_fraction > 0:
        theta = rng.uniform(0, 2 * np.pi)
        s = x * np.cos(theta) + y * np.sin(theta)
        codes[s > np.quantile(s, 1.0 - carbon_fraction)] = CARBON
    if vacuum_fraction > 0:
        radius = np.sqrt(vacuum_fraction * ny * nx / np.pi)
        free = np.argwhere(codes == ICE)
        cy, cx = free[rng.integers(len(free))] - np.array([ny / 2.0, nx / 2.0])
        angle = np.arctan2(y - cy, x - cx)
        wobble = 1.0 + 0.15 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
        inside = np.hypot(y - cy, x - cx) < radius * wobble
        codes[inside & (codes == ICE)] = VACUUM
    for _ in range(n_contamination):
        radius = rng.uniform(0.04, 0.12) * min(ny, nx)
        aspect = rng.uniform(0.7, 1.0)
        cy, cx = rng.uniform(-ny / 2, ny / 2), rng.uniform(-nx / 2, nx / 2)
        phi = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)
        v = -(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)
        d2 = (u / radius) ** 2 + (v / (aspect * radius)) ** 2
        lens = rng.uniform(2000.0, 5000.0) * np.sqrt(np.clip(1.0 - d2, 0.0, None))
        extra += lens
    codes[extra > 500.0] = CONTAMINATION
    return RegionGeometry(codes, extra)
