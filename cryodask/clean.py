"""Artifact removal over a dataset: the map/reduce around :mod:`cryodask.artifacts`.

Two passes over the micrographs:

1. *measure* (map, then reduce): impulses of each micrograph, summed into per-pixel
   statistics, give the dataset's defect map and residual gain estimate
   (:mod:`cryodask.defects`);
2. *correct* (map): each micrograph is multiplied by the user's gain reference (if any),
   divided by the gain estimate, and its impulses and defects are replaced by
   noise-consistent values.

Everything is lazy until the caller computes or writes it.
"""

from __future__ import annotations

import dataclasses

import dask.array as da
import numpy as np
import xarray as xr

from cryodask import progress
from cryodask.artifacts import DEFECT, HOT_PIXEL, XRAY, correct_pixels, find_impulses
from cryodask.defects import (N_GAIN_RINGS, N_STATISTICS, DatasetDefects, estimate_defects, micrograph_statistics,
                              ring_power)
from cryodask.ctf import CTFSearch
from cryodask.pipeline import check_image_chunks, estimate_ctf_dataset, regions_dataset, whole_chunks
from cryodask.regions import CONTAMINATION, VACUUM

__all__ = [
    "MIN_DATASET_MICROGRAPHS",
    "clean_dataset",
    "clean_for_fitting",
    "clean_one",
    "estimate_ctf_cleaned",
    "measure_defects",
]

#: Fewer micrographs than this give no dataset defect map or gain estimate.
MIN_DATASET_MICROGRAPHS = 4
#: The gain estimate is applied from this many micrographs on.
MIN_GAIN_MICROGRAPHS = 8
#: Micrographs per group of the dataset pass (:func:`measure_defects`): each group is
#: computed in turn, its statistics summed in a tree, so that what the pass holds is
#: bounded by the group and does not grow with the dataset (a tree over the whole
#: dataset holds one partial sum per level, log2 of the count: 512 micrographs of 512²
#: traced 72 MB at the peak, in groups of 8, 59 MB; 8 micrographs, 44 MB). A group runs
#: at most this many micrographs at once: on more threads than this, raise it with the
#: Dask config key ``cryodask.dataset-pass-group`` (the results then differ in the last
#: bits, from the order of the additions).
DATASET_PASS_GROUP = 8


def _stats_block(block, gain, defects):
    """One micrograph's statistics (:func:`cryodask.defects.micrograph_statistics`), kept
    compact for the sums (:func:`_compact_stats`), and, apart, its median count, Fano
    factor and power per gain ring."""
    image = block[0] * gain[0]
    found = find_impulses(image, defects=defects[0] > 0)
    stats = micrograph_statistics(image, found.mask)
    extra = np.zeros(2 + N_GAIN_RINGS)
    extra[:2] = float(np.median(image[::4, ::4])), found.fano
    if image.shape[0] > 1 and image.shape[1] >= N_GAIN_RINGS:
        extra[2:] = ring_power(stats)
    return _compact_stats(stats), extra


def _compact_stats(stats):
    """A micrograph's statistics as the dataset pass sums them: the normalised image
    (float32) and the counts of low and impulse pixels (uint16, exact for up to 65 535
    micrographs of a group). The valid plane is one minus the impulse plane: its sum is
    the group's count minus the impulses' (:func:`_full_stats`). Held by the pass's tree of
    sums: at 4096², 134 MB a micrograph where the four float32 planes are 268 MB."""
    return stats[0].copy(), np.stack([stats[2], stats[3]]).astype(np.uint16)


def _add_stats(a, b):
    (norm_a, counts_a), extra_a = a
    (norm_b, counts_b), extra_b = b
    return (norm_a + norm_b, counts_a + counts_b), extra_a + extra_b


def _full_stats(compact, count):
    """The four planes of :func:`cryodask.defects.micrograph_statistics`, summed over
    ``count`` micrographs, from their compact sums: the same numbers as summed whole (every
    plane but the first holds whole numbers, exact in float32 up to 2**24)."""
    norm, counts = compact
    out = np.empty((N_STATISTICS, *norm.shape), np.float32)
    out[0] = norm
    out[1] = count - counts[1].astype(np.float32)
    out[2:] = counts
    return out


def _inputs(ds, gain_reference, defects):
    image = ds["image"]
    check_image_chunks(image)
    shape = (image.sizes["y"], image.sizes["x"])
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=(1, -1, -1))
    if any(n != 1 for n in data.chunks[0]):
        # The dataset pass and the cleaning take one micrograph per task (a chunk of
        # several was read for its first micrograph alone).
        data = data.rechunk({0: 1})
    gain = np.ones(shape, np.float32) if gain_reference is None else np.asarray(gain_reference, np.float32)
    known = np.zeros(shape, np.float32) if defects is None else np.asarray(defects, np.float32)
    for name, arr in (("gain_reference", gain), ("defects", known)):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}; the micrographs are {shape}")
    return data, da.from_array(gain[None], chunks=-1), da.from_array(known[None], chunks=-1)


def measure_defects(ds: xr.Dataset, *, gain_reference=None, defects=None) -> DatasetDefects:
    """Pass 1: find the dataset's fixed defects and residual gain pattern (computes).

    Parameters
    ----------
    ds : xarray.Dataset
        With ``image (micrograph, y, x)``, at least :data:`MIN_DATASET_MICROGRAPHS`.
    gain_reference : (y, x) array, optional
        Multiplies every micrograph first (see :func:`cryodask.defects.read_gain_reference`).
    defects : (y, x) bool array, optional
        Known defects (e.g. from a defect file), added to what is found.
    """
    import dask

    data, gain, known = _inputs(ds, gain_reference, defects)
    n = data.shape[0]
    gain, known = (a.to_delayed().ravel()[0] for a in (gain, known))
    blocks = data.to_delayed().ravel()
    bounds = np.concatenate([[0], np.cumsum(data.chunks[0])]).astype(int)
    sums = extra = None
    group_size = int(dask.config.get("cryodask.dataset-pass-group", DATASET_PASS_GROUP))
    if not 1 <= group_size <= 65535:
        raise ValueError(f"Dask config 'cryodask.dataset-pass-group' must be in 1..65535, got {group_size}")
    for first, last in whole_chunks(data.chunks[0], group_size):
        level = [dask.delayed(_stats_block)(block, gain, known)
                 for block in blocks[np.searchsorted(bounds, first):np.searchsorted(bounds, last)]]
        # Summed two at a time: a task holds three micrographs' statistics at most (a wider
        # tree holds more at once; the count of additions is the same). The few numbers per
        # micrograph travel beside the statistics, not as a plane of them.
        while len(level) > 1:
            level = [dask.delayed(_add_stats)(*level[i:i + 2]) if i + 1 < len(level) else level[i]
                     for i in range(0, len(level), 2)]
        ((group, group_extra),) = progress.compute(level[0])
        group = _full_stats(group, last - first)
        if sums is None:
            sums, extra = group, group_extra
        else:
            # The groups' sums added one after another, in single precision: for 10 000
            # micrographs in groups of 8, 1249 additions, whose rounding (at most ~1e-4
            # of the sum) stays below the gain estimate's own error there (~1e-3 a pixel
            # at 40 counts).
            if not sums.flags.writeable:  # as a worker process sent it
                sums = sums.copy()
            sums += group
            extra = extra + group_extra
    mean_counts = float(extra[0]) / n
    fano = float(extra[1]) / n
    rings = extra[2:] if sums.shape[1] > 1 and sums.shape[2] >= N_GAIN_RINGS else None
    found = estimate_defects(sums, n, mean_counts=mean_counts if fano > 0 else None,
                             fano=fano if fano > 0 else 1.0, min_micrographs=MIN_DATASET_MICROGRAPHS,
                             ring_power=rings)
    if defects is not None:
        combined = found.defects | np.asarray(defects, bool)
        found = dataclasses.replace(found, defects=combined)
    return found


def _clean_block(block, gain, divisor, defects, index, *, seed):
    corrected, mask = clean_one(block[0], gain[0], divisor[0], defects[0] > 0, int(index.ravel()[0]), seed=seed)
    return np.stack([corrected, mask.astype(np.float32)])[None]


def clean_one(image, gain, divisor, defects, index: int, *, seed: int):
    """One micrograph as :func:`clean_dataset` corrects it: times ``gain``, over ``divisor``
    (either None: not applied), its impulses and ``defects`` replaced with fill noise drawn
    from ``seed`` and its ``index`` in the dataset. Returns the corrected image (float32)
    and the mask (codes of :mod:`cryodask.artifacts`)."""
    if gain is not None:
        image = image * gain
    if divisor is not None:
        image = image / divisor
    found = find_impulses(image, defects=defects)
    corrected = correct_pixels(image, found.mask, found.reference, found.sigma,
                               counting=found.counting, fano=found.fano, seed=seed * 1_000_003 + index)
    return corrected, found.mask


def clean_dataset(ds: xr.Dataset, *, gain_reference=None, defects=None, dataset_defects: bool = True,
                  gain_correction: bool | None = None, seed: int = 0,
                  measured: DatasetDefects | None = None) -> xr.Dataset:
    """Correct every micrograph's impulse artifacts and defects (lazy, one task each).

    Parameters
    ----------
    ds : xarray.Dataset
    gain_reference : (y, x) array, optional
        A user's gain reference; multiplies each micrograph first (MotionCor2's convention).
    defects : (y, x) bool array, optional
        A user's known defects (e.g. :func:`cryodask.defects.read_defect_file`).
    dataset_defects : bool
        Find fixed defects and the residual gain from the whole dataset first (pass 1,
        computed now) when it has at least :data:`MIN_DATASET_MICROGRAPHS` micrographs.
    gain_correction : bool, optional
        Divide by the dataset's gain estimate; default when it has at least
        :data:`MIN_GAIN_MICROGRAPHS` micrographs.
    seed : int
        The fill noise is drawn from it and the micrograph's index: results repeat.
    measured : DatasetDefects, optional
        Pass 1's result when the caller already has it (:func:`measure_defects` on the same
        micrographs, gain reference and defects), so that it is not computed again.

    Returns
    -------
    xarray.Dataset
        ``image_clean (micrograph, y, x)`` float32; ``artifact_mask`` uint8 (codes of
        :mod:`cryodask.artifacts`); ``n_hot_pixels``, ``n_xray_pixels``,
        ``n_defect_pixels`` per micrograph; and, from pass 1, ``defect_map`` and
        ``gain_estimate`` ``(y, x)``. Outside the mask, ``image_clean`` equals the input
        times the gain reference divided by the gain estimate.
    """
    n = ds.sizes["micrograph"]
    shape = (ds.sizes["y"], ds.sizes["x"])
    found = measured
    if found is None and dataset_defects and n >= MIN_DATASET_MICROGRAPHS:
        found = measure_defects(ds, gain_reference=gain_reference, defects=defects)
    if gain_correction is None:
        gain_correction = found is not None and n >= MIN_GAIN_MICROGRAPHS
    if gain_correction and found is None:
        raise ValueError(f"gain correction needs the dataset pass (dataset_defects=True) and at "
                         f"least {MIN_DATASET_MICROGRAPHS} micrographs; got {n}")
    known = found.defects if found is not None else defects
    data, gain, known_da = _inputs(ds, gain_reference, known)
    divisor = found.gain if gain_correction else np.ones(shape, np.float32)
    divisor_da = da.from_array(np.asarray(divisor, np.float32)[None], chunks=-1)
    index = da.arange(n, chunks=data.chunks[0])
    both = da.map_blocks(_clean_block, data, gain, divisor_da, known_da, index[:, None, None],
                         dtype=np.float32, seed=seed,
                         chunks=(data.chunks[0], (2,), data.chunks[1], data.chunks[2]), new_axis=1)
    dims = ("micrograph", "y", "x")
    mask = both[:, 1].astype(np.uint8)
    out = xr.Dataset({
        "image_clean": (dims, both[:, 0], {"long_name": "artifact-corrected micrograph"}),
        "artifact_mask": (dims, mask, {"codes": "0 good, 1 hot pixel, 2 X-ray, 3 defect"}),
        "n_hot_pixels": ("micrograph", (mask == HOT_PIXEL).sum(axis=(1, 2)).astype(np.int32)),
        "n_xray_pixels": ("micrograph", (mask == XRAY).sum(axis=(1, 2)).astype(np.int32)),
        "n_defect_pixels": ("micrograph", (mask == DEFECT).sum(axis=(1, 2)).astype(np.int32)),
    })
    if found is not None:
        out["defect_map"] = (("y", "x"), found.defects.astype(np.uint8), {"codes": "1 defect"})
        out["gain_estimate"] = (("y", "x"), found.gain, {"applied": int(bool(gain_correction))})
    return out


def estimate_ctf_cleaned(ds: xr.Dataset, *, search: CTFSearch = CTFSearch(), gain_reference=None,
                         defects=None, measured: DatasetDefects | None = None, prior=None,
                         prior_window: float = 0.25) -> xr.Dataset:
    """CTF estimation robust to artifacts: clean, find regions, fit what is left (lazy).

    Each micrograph is corrected in memory (:func:`clean_dataset`, with the dataset's
    defects and gain when there are enough micrographs), its vacuum and contamination are
    left out of its spectrum, and the ice-ring shells carry no weight. Nothing is written.
    ``gain_reference``, ``defects`` and ``measured`` are those of :func:`clean_dataset`;
    ``prior`` and ``prior_window`` those of :func:`cryodask.pipeline.estimate_ctf_dataset`.

    Returns
    -------
    xarray.Dataset
        The CTF variables of :func:`cryodask.pipeline.estimate_ctf_dataset`, with
        ``n_hot_pixels``, ``n_xray_pixels``, ``n_defect_pixels`` and
        ``region_fraction_<kind>`` per micrograph.
    """
    work, exclude, extra = clean_for_fitting(ds, gain_reference=gain_reference, defects=defects,
                                             measured=measured)
    return xr.merge([estimate_ctf_dataset(work, search=search, exclude=exclude, prior=prior,
                                          prior_window=prior_window), extra])


def clean_for_fitting(ds: xr.Dataset, *, gain_reference=None, defects=None,
                      measured: DatasetDefects | None = None):
    """The micrographs as the fitting steps see them (lazy): cleaned, with their exclusion.

    Returns
    -------
    work : xarray.Dataset
        ``ds`` with ``image`` replaced by the cleaned images (:func:`clean_dataset`).
    exclude : DataArray (micrograph, y, x) bool
        Vacuum and contamination (:func:`cryodask.pipeline.regions_dataset`).
    extra : xarray.Dataset
        ``n_hot_pixels``, ``n_xray_pixels``, ``n_defect_pixels`` and
        ``region_fraction_<kind>`` per micrograph.
    """
    cleaned = clean_dataset(ds, gain_reference=gain_reference, defects=defects, measured=measured)
    work = ds.assign(image=cleaned["image_clean"])
    regions = regions_dataset(work)
    exclude = regions["region_mask"].isin([VACUUM, CONTAMINATION])
    counts = cleaned[["n_hot_pixels", "n_xray_pixels", "n_defect_pixels"]]
    fractions = regions[[name for name in regions.data_vars if name.startswith("region_fraction_")]]
    return work, exclude, xr.merge([counts, fractions])
