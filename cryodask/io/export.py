"""Write store variables back out as files users' other tools read."""

from __future__ import annotations

import os

import dask
import numpy as np
import xarray as xr

from cryodask import progress
from cryodask.io.images import EXACT_IN_FLOAT32, write_mrc

__all__ = ["export_mrc", "output_paths", "output_stem"]


def output_stem(micrograph_name: str) -> str:
    """The file stem an output for this micrograph gets: ``foo`` for ``dir/foo.mrc``,
    ``foo_000003`` for section ``000003@dir/foo.mrcs``."""
    section, _, path = str(micrograph_name).rpartition("@")
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}_{section}" if section else stem


def output_paths(ds: xr.Dataset, out_dir, suffix: str = "") -> list:
    """``out_dir/<stem><suffix>.mrc`` for each micrograph of ``ds`` (:func:`output_stem`);
    an error if two micrographs would share one."""
    paths = [os.path.join(os.fspath(out_dir), output_stem(str(n)) + suffix + ".mrc")
             for n in ds["micrograph_name"].values]
    seen = {}
    for name, path in zip(ds["micrograph_name"].values, paths):
        if path in seen:
            raise ValueError(f"{seen[path]} and {name} would both be written to {path}: their input "
                             "files share a name in different folders")
        seen[path] = name
    return paths


def _write_one(path, data, pixel_size_A, dtype, overwrite):
    data = np.asarray(data)
    if dtype != "float32":
        target = np.dtype(dtype)
        converted = data.astype(target)
        if not np.array_equal(converted.astype(np.float32), data):
            raise ValueError(f"{path}: values do not fit {dtype} exactly; export as float32")
        data = converted
    write_mrc(path, data, pixel_size_A=pixel_size_A, overwrite=overwrite)
    return path


def export_mrc(ds: xr.Dataset, out_dir, *, variable: str = "image", dtype: str = "source",
               suffix: str = "", overwrite: bool = False, compute: bool = True) -> list:
    """Write each micrograph of ``ds[variable]`` to ``out_dir/<stem><suffix>.mrc``.

    Parameters
    ----------
    ds : xarray.Dataset
        A store's dataset (lazy is fine; one task per micrograph writes its file).
    out_dir : path
    variable : str
        A ``(micrograph, y, x)`` variable.
    dtype : {"source", "float32"} or a NumPy integer dtype name
        ``"source"`` writes each micrograph in the dtype its input file had (exact for
        8/16-bit integers and float16/32), so an ingest-export round trip is bit-exact.
    suffix : str
        Added to each file stem, e.g. ``"_mask"``.

    compute : bool
        False returns the write tasks (Dask delayed objects) instead, so that several
        exports of one lazy computation run together.

    Returns
    -------
    list of str
        The paths written, in micrograph order (or the tasks that write them).
    """
    if variable not in ds:
        raise KeyError(f"the dataset has no variable {variable!r}; it has {sorted(ds.data_vars)}")
    da_ = ds[variable]
    if da_.dims != ("micrograph", "y", "x"):
        raise ValueError(f"{variable} has dims {da_.dims}; expected ('micrograph', 'y', 'x')")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = output_paths(ds, out_dir, suffix)
    if dtype == "source":
        dtypes = [str(d) for d in ds["source_dtype"].values] if "source_dtype" in ds else ["float32"] * len(paths)
        dtypes = [d if d in EXACT_IN_FLOAT32 else "float32" for d in dtypes]
    else:
        dtypes = [str(np.dtype(dtype))] * len(paths)
    pixel = ds["pixel_size_A"].values if "pixel_size_A" in ds else np.full(len(paths), ds.attrs["pixel_size_A"])
    tasks = [
        dask.delayed(_write_one)(path, da_.data[i], float(pixel[i]), dtypes[i], overwrite)
        for i, path in enumerate(paths)
    ]
    return list(progress.compute(*tasks)) if compute else tasks
