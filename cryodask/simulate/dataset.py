"""Simulated datasets: many micrographs sharing a detector, written as real MRC files.

The ground truth goes beside them: ``truth.csv`` (one row per micrograph: every node's
parameters and the noise variance of each cause) and, on request, the CTF-free
projection, the CTF-applied clean image and the artifact mask of each micrograph.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import dask
import numpy as np
import pandas as pd

from cryodask import progress
from cryodask.io.images import write_mrc
from cryodask.simulate.micrograph import detector_state, simulate_micrograph
from cryodask.simulate.params import Detector, MicrographParams

__all__ = ["DatasetRanges", "draw_micrograph_params", "write_simulated_dataset"]


@dataclass(frozen=True)
class DatasetRanges:
    """Uniform ranges from which each micrograph's nodes are drawn."""

    defocus_A: tuple[float, float] = (8000.0, 30000.0)
    astigmatism_A: tuple[float, float] = (0.0, 1000.0)
    dose_e_per_A2: tuple[float, float] = (20.0, 60.0)
    ice_thickness_A: tuple[float, float] = (150.0, 1000.0)
    b_motion_A2: tuple[float, float] = (10.0, 80.0)
    n_hot_pixels: tuple[int, int] = (0, 0)
    n_xrays: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        for name, (low, high) in asdict(self).items():
            if low > high or low < 0:
                raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high, "
                                 f"got {(low, high)}")


def draw_micrograph_params(n: int, *, shape=(1024, 1024), pixel_size_A: float = 1.0,
                           ranges: DatasetRanges = DatasetRanges(), seed: int = 0,
                           **fixed) -> list[MicrographParams]:
    """Draw ``n`` micrographs' parameters from ``ranges`` (deterministic by seed).

    ``fixed`` sets any other :class:`MicrographParams` field for every micrograph.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    rng = np.random.default_rng([seed, 15485863])
    out = []
    for _ in range(n):
        mean = rng.uniform(*ranges.defocus_A)
        astig = rng.uniform(*ranges.astigmatism_A)
        values = dict(
            shape=tuple(shape),
            pixel_size_A=pixel_size_A,
            defocus_u_A=mean + astig / 2,
            defocus_v_A=mean - astig / 2,
            defocus_angle_deg=rng.uniform(0.0, 180.0),
            dose_e_per_A2=rng.uniform(*ranges.dose_e_per_A2),
            ice_thickness_A=rng.uniform(*ranges.ice_thickness_A),
            b_motion_A2=rng.uniform(*ranges.b_motion_A2),
            n_hot_pixels=int(rng.integers(ranges.n_hot_pixels[0], ranges.n_hot_pixels[1] + 1)),
            n_xrays=int(rng.integers(ranges.n_xrays[0], ranges.n_xrays[1] + 1)),
        )
        values.update(fixed)
        out.append(MicrographParams(**values))
    return out


def _simulate_and_write(path, params, state, seed, truth_dir):
    sim = simulate_micrograph(params, detector=state, seed=seed)
    write_mrc(path, sim.image, pixel_size_A=params.pixel_size_A, overwrite=True)
    if truth_dir is not None:
        stem = os.path.splitext(os.path.basename(path))[0]
        for name in ("projection", "clean", "mask"):
            write_mrc(os.path.join(truth_dir, f"{stem}_{name}.mrc"), getattr(sim, name),
                      pixel_size_A=params.pixel_size_A, overwrite=True)
    row = {k: v for k, v in asdict(params).items() if k not in ("shape", "ctf")}
    row.update({f"noise_var_{k}": v for k, v in sim.noise_variance.items()})
    row["signal_var"] = sim.signal_variance
    row["n_particles_placed"] = len(sim.particle_centres_px)
    row["n_artifact_pixels"] = int((sim.mask > 0).sum())
    return row


def write_simulated_dataset(out_dir, params: list[MicrographParams], *,
                            detector: Detector = Detector(), seed: int = 0,
                            save_truth_images: bool = False, prefix: str = "mic") -> pd.DataFrame:
    """Simulate micrographs and write them as ``out_dir/<prefix>_NNNN.mrc`` (float32).

    One Dask task per micrograph (so an active distributed client spreads the work). The
    detector is realised once and shared. ``truth.csv`` and, with ``save_truth_images``,
    ``truth/<stem>_{projection,clean,mask}.mrc`` hold the ground truth.

    Returns
    -------
    DataFrame
        The truth table, one row per micrograph, with a ``micrograph`` column (file path).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shapes = {p.shape for p in params}
    if len(shapes) != 1:
        raise ValueError(f"all micrographs of a dataset share one shape, got {sorted(shapes)}")
    state = detector_state(detector, next(iter(shapes)))
    truth_dir = None
    if save_truth_images:
        truth_dir = os.path.join(out_dir, "truth")
        os.makedirs(truth_dir, exist_ok=True)
        write_mrc(os.path.join(truth_dir, "gain.mrc"), state.gain,
                  pixel_size_A=params[0].pixel_size_A, overwrite=True)
        write_mrc(os.path.join(truth_dir, "defects.mrc"), state.defects.astype(np.uint8),
                  pixel_size_A=params[0].pixel_size_A, overwrite=True)
    paths = [os.path.join(out_dir, f"{prefix}_{i:04d}.mrc") for i in range(len(params))]
    state_d = dask.delayed(state)
    tasks = [dask.delayed(_simulate_and_write)(path, p, state_d, seed * 1_000_003 + i, truth_dir)
             for i, (path, p) in enumerate(zip(paths, params))]
    rows = progress.compute(*tasks)
    table = pd.DataFrame(rows)
    table.insert(0, "micrograph", paths)
    for name, value in asdict(detector).items():
        table[f"detector_{name}"] = value
    table.to_csv(os.path.join(out_dir, "truth.csv"), index=False)
    return table
