"""Ingest (Module 1): micrograph files and their metadata into a store.

Files are read on the Dask workers, lazily, one task per micrograph; the client only
gathers headers (also read on the workers) to plan the graph.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Sequence

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from cryodask.io.images import ImageHeader, probe, read_micrograph
from cryodask.io.metadata import (
    METADATA_FIELDS,
    find_sidecar_metadata,
    read_coordinates,
    read_metadata_table,
)
from cryodask.io.store import write_store

__all__ = ["IngestError", "expand_paths", "ingest", "micrographs_dataset"]

logger = logging.getLogger(__name__)

#: Defaults used when neither the caller nor any metadata source gives a value.
DEFAULTS = {"voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.07}
_STACK_CHOICES = ("auto", "micrographs", "sum", "error")


class IngestError(ValueError):
    """Input that cannot be ingested as asked; the message names the files."""


def expand_paths(paths: str | os.PathLike | Iterable) -> list[str]:
    """Expand globs; keep every path as given. Missing files and empty globs are errors."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for item in paths:
        item = os.fspath(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise IngestError(f"{item}: the pattern matches no file")
            out.extend(matches)
        elif not os.path.isfile(item):
            raise IngestError(f"{item}: no such file")
        else:
            out.append(item)
    if not out:
        raise IngestError("no input files given")
    return out


def _probe_with_sidecars(path: str) -> tuple[ImageHeader, list[dict]]:
    header = probe(path)
    return header, find_sidecar_metadata(path, header.n_sections)


def _load(path: str, section: int | None, sum_frames: bool) -> np.ndarray:
    return read_micrograph(path, section, sum_frames=sum_frames).astype(np.float32, copy=False)


def micrographs_dataset(
    paths,
    *,
    pixel_size_A: float | None = None,
    voltage_kV: float | None = None,
    cs_mm: float | None = None,
    amplitude_contrast: float | None = None,
    dose_e_per_A2: float | None = None,
    metadata: Sequence | str | None = None,
    coordinates: Sequence | str | None = None,
    stack: str = "auto",
) -> xr.Dataset:
    """A lazy dataset of micrograph files, ready to write or to compute on.

    Parameters are those of :func:`ingest`, without the store. Headers are read now (as Dask
    tasks, so on the workers of an active distributed client); the pixels are read when the
    returned dataset's ``image`` is computed.
    """
    if stack not in _STACK_CHOICES:
        raise ValueError(f"stack must be one of {_STACK_CHOICES}, got {stack!r}")
    paths = expand_paths(paths)
    probed = dask.compute(*[dask.delayed(_probe_with_sidecars)(p) for p in paths])
    tables = []
    for source in _as_list(metadata):
        tables.append(dask.delayed(read_metadata_table)(os.fspath(source)))
    tables = list(dask.compute(*tables)) if tables else []

    rows = []  # one per micrograph
    for header, sidecars in probed:
        sum_frames, sections = _sections(header, stack)
        for section in sections:
            meta = sidecars[section or 0]
            rows.append({
                "name": header.path if section is None else f"{section + 1:06d}@{header.path}",
                "header": header,
                "section": section,
                "sum_frames": sum_frames,
                "sidecar": meta,
            })

    shapes = {}
    for row in rows:
        shapes.setdefault(row["header"].shape, []).append(row["header"].path)
    if len(shapes) > 1:
        listing = "; ".join(f"{s[0]}x{s[1]}: {files[0]} (+{len(files) - 1} more)"
                            for s, files in shapes.items())
        raise IngestError(f"micrographs of different shapes cannot share a store ({listing}); "
                          "ingest each shape into its own store")
    shape = next(iter(shapes))

    explicit = {"pixel_size_A": pixel_size_A, "voltage_kV": voltage_kV, "cs_mm": cs_mm,
                "amplitude_contrast": amplitude_contrast, "dose_e_per_A2": dose_e_per_A2}
    table = _merge_tables(tables)
    values = {name: [] for name in METADATA_FIELDS}
    for row in rows:
        resolved = _resolve(row, explicit, table)
        for name in METADATA_FIELDS:
            values[name].append(resolved.get(name, np.nan))

    pixel = np.asarray(values["pixel_size_A"], dtype=np.float64)
    missing = [row["header"].path for row, p in zip(rows, pixel) if not p > 0]
    if missing:
        raise IngestError(
            f"no pixel size for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + ": its header gives none and no metadata file does; pass pixel_size_A (--pixel-size)"
        )
    if np.ptp(pixel) > 1e-4 * pixel.max():
        distinct = sorted({round(float(p), 5) for p in pixel})
        examples = {round(float(p), 5): row["header"].path for row, p in zip(rows, pixel)}
        listing = ", ".join(f"{p} Å ({examples[p]})" for p in distinct)
        raise IngestError(f"micrographs have different pixel sizes: {listing}; pass pixel_size_A "
                          "to state the one to use, or ingest them into separate stores")
    for name in ("voltage_kV", "cs_mm", "amplitude_contrast"):
        values[name] = [DEFAULTS[name] if not np.isfinite(v) else v for v in values[name]]
    _validate_ranges(values, rows)

    loads = [
        da.from_delayed(dask.delayed(_load)(row["header"].path, row["section"], row["sum_frames"]),
                        shape=shape, dtype=np.float32)
        for row in rows
    ]
    image = da.stack(loads).rechunk((1, -1, -1))
    px = float(pixel[0])
    n = len(rows)
    ds = xr.Dataset(
        {
            "image": (("micrograph", "y", "x"), image, {"long_name": "micrograph", "units": "counts"}),
            "micrograph_name": ("micrograph", np.array([r["name"] for r in rows], dtype=object)),
            "source_file": ("micrograph", np.array([r["header"].path for r in rows], dtype=object)),
            "source_section": ("micrograph", np.array(
                [-1 if r["section"] is None else r["section"] for r in rows], dtype=np.int32)),
            "source_dtype": ("micrograph", np.array(
                ["float32" if r["sum_frames"] else r["header"].dtype for r in rows], dtype=object)),
        },
        coords={
            "micrograph": ("micrograph", np.arange(n, dtype=np.int64)),
            "y": ("y", (np.arange(shape[0]) * px).astype(np.float64), {"units": "Å"}),
            "x": ("x", (np.arange(shape[1]) * px).astype(np.float64), {"units": "Å"}),
        },
        attrs={"description": "cryodask micrograph store", "pixel_size_A": px},
    )
    units = {"pixel_size_A": "Å", "voltage_kV": "kV", "cs_mm": "mm", "amplitude_contrast": "1",
             "dose_e_per_A2": "e/Å²", "applied_defocus_A": "Å (positive = underfocus)"}
    for name in METADATA_FIELDS:
        ds[name] = ("micrograph", np.asarray(values[name], dtype=np.float32), {"units": units[name]})
    if coordinates is not None:
        ds = ds.merge(_particles(coordinates, ds))
    return ds


def ingest(paths, store, *, overwrite: bool = False, pixel_size_A: float | None = None,
           voltage_kV: float | None = None, cs_mm: float | None = None, amplitude_contrast: float | None = None,
           dose_e_per_A2: float | None = None, metadata: Sequence | str | None = None,
           coordinates: Sequence | str | None = None, stack: str = "auto") -> xr.Dataset:
    """Ingest micrograph files into a new store and return it, opened lazily.

    Parameters
    ----------
    paths : str, path-like or sequence of them
        MRC/MRCS or TIFF files, or glob patterns. Each path is kept as given, as the
        micrograph's name (``NNNNNN@path`` for the sections of a stack file).
    store : str or path-like
        The new store (a directory, ``*.zarr`` by convention).
    overwrite : bool
        Replace an existing store at that path.
    pixel_size_A, voltage_kV, cs_mm, amplitude_contrast, dose_e_per_A2 : float, optional
        Override every other source. Otherwise each comes from a metadata table
        (``metadata=``), then a sidecar file beside the micrograph (EPU ``.xml``, SerialEM
        ``.mdoc``), then the MRC header (voltage, dose and applied defocus from an FEI
        extended header). The pixel size is the exception: a non-zero voxel size in the
        image's own header wins over a sidecar's, which may describe unbinned frames.
        Voltage, Cs and amplitude contrast fall back to 300 kV, 2.7 mm and 0.07.
    metadata : path or sequence of paths, optional
        RELION micrograph STAR files, EPU XML or mdoc files, matched to micrographs by name.
    coordinates : path or sequence of paths, optional
        Particle coordinate files (see :func:`cryodask.io.metadata.read_coordinates`),
        stored as ``particle_*`` variables along a ``particle`` dimension.
    stack : {"auto", "micrographs", "sum", "error"}
        What a file with several 2D sections is: each a micrograph (``.mrcs`` files under
        "auto"), the frames of a movie to sum without alignment ("sum"), or an error
        ("error", and what "auto" does for other multi-section files).

    Returns
    -------
    xarray.Dataset
        The new store, opened lazily.

    Raises
    ------
    IngestError, MicrographFileError, MetadataFileError
        Missing or unreadable files, mixed shapes or pixel sizes, NaN/Inf pixels; every
        message names the file.
    """
    from cryodask.io.store import open_dataset

    ds = micrographs_dataset(paths, pixel_size_A=pixel_size_A, voltage_kV=voltage_kV, cs_mm=cs_mm,
                             amplitude_contrast=amplitude_contrast, dose_e_per_A2=dose_e_per_A2,
                             metadata=metadata, coordinates=coordinates, stack=stack)
    write_store(ds, store, overwrite=overwrite)
    logger.info("ingested %d micrographs into %s", ds.sizes["micrograph"], store)
    return open_dataset(store)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def _sections(header: ImageHeader, stack: str) -> tuple[bool, list]:
    if header.n_sections == 1:
        return False, [None]
    mode = stack
    if mode == "auto":
        mode = "micrographs" if header.is_stack_file else "error"
    if mode == "error":
        raise IngestError(
            f"{header.path}: holds {header.n_sections} images of {header.shape[0]}x{header.shape[1]}; "
            "say whether they are separate micrographs (stack='micrographs', --stack micrographs) "
            "or the frames of a movie to sum (stack='sum', --stack sum)"
        )
    if mode == "sum":
        return True, [None]
    return False, list(range(header.n_sections))


def _merge_tables(tables: list[pd.DataFrame]) -> pd.DataFrame | None:
    if not tables:
        return None
    table = pd.concat(tables, ignore_index=True)
    table["key"] = table["micrograph_name"].map(_name_key)
    return table.drop_duplicates("key", keep="last").set_index("key")


def _name_key(name: str) -> str:
    """Match names across sources by file stem (RELION tables often drop directories)."""
    base = os.path.basename(str(name).split("@")[-1])
    return os.path.splitext(base)[0]


def _resolve(row: dict, explicit: dict, table: pd.DataFrame | None) -> dict:
    header: ImageHeader = row["header"]
    resolved = {name: getattr(header, name, None) for name in METADATA_FIELDS}
    resolved = {k: v for k, v in resolved.items() if v is not None}
    sidecar = {k: v for k, v in row["sidecar"].items() if v is not None}
    if header.pixel_size_A:
        # The image's own header knows its binning; an acquisition sidecar may not.
        sidecar.pop("pixel_size_A", None)
    resolved.update(sidecar)
    if table is not None:
        key = _name_key(row["name"])
        if key in table.index:
            for name in METADATA_FIELDS:
                if name in table.columns and pd.notna(table.at[key, name]):
                    resolved[name] = float(table.at[key, name])
    resolved.update({k: float(v) for k, v in explicit.items() if v is not None})
    return resolved


_RANGES = {
    "pixel_size_A": (0.05, 100.0),
    "voltage_kV": (10.0, 3000.0),
    "cs_mm": (0.0, 20.0),
    "amplitude_contrast": (0.0, 0.999),
    "dose_e_per_A2": (0.0, 10000.0),
}


def _validate_ranges(values: dict, rows: list) -> None:
    for name, (low, high) in _RANGES.items():
        for value, row in zip(values[name], rows):
            if np.isfinite(value) and not low <= value <= high:
                raise IngestError(f"{row['name']}: {name} = {value:g} is outside the valid range "
                                  f"[{low:g}, {high:g}]")


def _particles(coordinates, ds: xr.Dataset) -> xr.Dataset:
    tables = dask.compute(*[dask.delayed(read_coordinates)(os.fspath(p)) for p in _as_list(coordinates)])
    table = pd.concat(tables, ignore_index=True)
    keys = {_name_key(n): i for i, n in enumerate(ds["micrograph_name"].values)}
    index = table["micrograph_name"].map(lambda n: keys.get(_name_key(n), -1))
    unmatched = sorted(set(table["micrograph_name"][index < 0]))
    if unmatched:
        raise IngestError(f"particle coordinates name micrographs not in the input: {unmatched[:3]}"
                          + (f" (+{len(unmatched) - 3} more)" if len(unmatched) > 3 else ""))
    return xr.Dataset({
        "particle_micrograph": ("particle", index.to_numpy(np.int64)),
        "particle_x_px": ("particle", table["x_px"].to_numpy(np.float32), {"units": "pixel"}),
        "particle_y_px": ("particle", table["y_px"].to_numpy(np.float32), {"units": "pixel"}),
        "particle_figure_of_merit": ("particle", table["figure_of_merit"].to_numpy(np.float32)),
    })
