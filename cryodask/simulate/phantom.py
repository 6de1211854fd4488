"""Particles: 3D densities made of Gaussian atoms, and their projections."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "PROTEIN_ATOMS_PER_A3",
    "atoms_from_model",
    "gaussian_phantom",
    "splat_projections",
]

#: Heavy (non-hydrogen) atoms per Å^3 of protein, from a density of 1.35 g/cm^3.
PROTEIN_ATOMS_PER_A3 = 0.058


def gaussian_phantom(*, radius_A: float = 50.0, n_lobes: int = 6, seed: int = 0) -> np.ndarray:
    """A globular, lumpy protein-like particle as atom positions.

    The particle is the union of ``n_lobes`` spheres of radius ``0.55 * radius_A`` whose
    centres lie within ``0.45 * radius_A`` of the origin, filled uniformly with atoms at
    protein density (:data:`PROTEIN_ATOMS_PER_A3`).

    Parameters
    ----------
    radius_A : float
        Outer radius of the particle in Å, > 0.
    n_lobes : int
        Number of overlapping spheres, >= 1.
    seed : int
        The phantom is a deterministic function of its arguments.

    Returns
    -------
    ndarray of shape (n_atoms, 3), float32
        Atom positions ``(x, y, z)`` in Å, centred on the origin.
    """
    if not radius_A > 0:
        raise ValueError(f"radius_A must be > 0, got {radius_A!r}")
    if n_lobes < 1:
        raise ValueError(f"n_lobes must be >= 1, got {n_lobes!r}")
    rng = np.random.default_rng(seed)
    lobe_r = 0.55 * radius_A
    centres = _uniform_in_ball(rng, n_lobes, 0.45 * radius_A)
    # Sample the bounding ball, keep points inside any lobe: uniform density in the union.
    n_try = int(PROTEIN_ATOMS_PER_A3 * 4.0 / 3.0 * np.pi * radius_A**3)
    pts = _uniform_in_ball(rng, n_try, radius_A)
    d2 = ((pts[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    inside = (d2 <= lobe_r**2).any(axis=1)
    atoms = pts[inside]
    return (atoms - atoms.mean(axis=0)).astype(np.float32)


def atoms_from_model(path) -> np.ndarray:
    """Heavy-atom positions of an atomic model (PDB or mmCIF), centred on the origin.

    Needs the optional ``gemmi`` package (``pip install cryodask[models]``).

    Returns
    -------
    ndarray of shape (n_atoms, 3), float32, in Å.
    """
    try:
        import gemmi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading atomic models needs gemmi: pip install 'cryodask[models]'"
        ) from exc
    structure = gemmi.read_structure(str(path))
    structure.remove_hydrogens()
    model = structure[0]
    xyz = [atom.pos.tolist() for chain in model for residue in chain for atom in residue]
    if not xyz:
        raise ValueError(f"{path}: the atomic model has no heavy atoms in its first model")
    atoms = np.asarray(xyz, dtype=np.float64)
    return (atoms - atoms.mean(axis=0)).astype(np.float32)


def splat_projections(atoms: np.ndarray, centres_px: np.ndarray, rotations: Rotation,
                      shape: tuple[int, int], pixel_size_A: float) -> np.ndarray:
    """Project rotated copies of ``atoms`` along z onto a grid, one unit per atom.

    Each atom is spread bilinearly over its four nearest pixels (periodic edges), so the
    result is the sampled sum of delta functions; convolving it with the atom's Gaussian in
    Fourier space gives the projected density.

    Parameters
    ----------
    atoms : (n_atoms, 3) array, Å
    centres_px : (n_particles, 2) array
        ``(y, x)`` centre of each particle in pixels.
    rotations : scipy Rotation of length n_particles
    shape : (ny, nx)
    pixel_size_A : float

    Returns
    -------
    ndarray of shape ``shape``, float32
        Atoms per pixel.
    """
    ny, nx = shape
    if len(centres_px) == 0:
        return np.zeros(shape, dtype=np.float32)
    xyz = np.concatenate([rot.apply(atoms) for rot in rotations])
    centres = np.repeat(np.asarray(centres_px, dtype=np.float64), len(atoms), axis=0)
    x = xyz[:, 0] / pixel_size_A + centres[:, 1]
    y = xyz[:, 1] / pixel_size_A + centres[:, 0]
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    idx, weights = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            idx.append(((y0 + dy) % ny) * nx + (x0 + dx) % nx)
            weights.append(wy * wx)
    out = np.bincount(np.concatenate(idx), weights=np.concatenate(weights), minlength=ny * nx)
    return out.reshape(ny, nx).astype(np.float32)


def _uniform_in_ball(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    r = radius * rng.random(n) ** (1.0 / 3.0)
    return direction * r[:, None]
