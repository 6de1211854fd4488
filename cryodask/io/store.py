"""The dataset store: an ``xarray.Dataset`` persisted as a Zarr v3 group.

A store is created whole or not at all: it is written under a temporary name beside its
final path and renamed when every chunk is on disk. Results added later are written as new
variables; while they are being written the group's ``cryodask_pending`` attribute names
them, so an interrupted write is detected when the store is opened again.
"""

from __future__ import annotations

import os
import shutil
import uuid

import xarray as xr
import zarr

from cryodask import progress

__all__ = [
    "FORMAT_VERSION",
    "IncompleteStoreError",
    "StoreError",
    "open_dataset",
    "per_micrograph",
    "write_store",
    "write_variables",
]

FORMAT_VERSION = 1
_FORMAT_KEY = "cryodask_format"
_PENDING_KEY = "cryodask_pending"


class StoreError(ValueError):
    """A path that is not a usable cryodask store; the message names it."""


class IncompleteStoreError(StoreError):
    """A store (or some of its variables) whose write did not finish."""


def _encoding(ds: xr.Dataset, keep_bits: dict | None = None) -> dict:
    """Codecs of new arrays: Blosc LZ4 with bit shuffling for numbers, chosen by
    measurement (``python -m benchmarks.bench_codecs``: on a real EPU micrograph's counts a
    ratio of 2.60 against 1.99 for Zarr's default Zstd, written 4.7x and read 2.5x faster).
    ``keep_bits`` (variable -> bits) rounds those float variables' mantissas first
    (lossy, Zarr ``numcodecs.bitround``)."""
    import warnings

    import zarr.codecs as zc

    keep_bits = dict(keep_bits or {})
    unknown = sorted(set(keep_bits) - set(ds.data_vars))
    if unknown:
        raise ValueError(f"keep_bits names {unknown}, not variables being written ({sorted(ds.data_vars)})")
    out = {}
    for name, var in ds.data_vars.items():
        if var.dtype.kind not in "fiub":
            continue
        out[name] = {"compressors": [zc.BloscCodec(cname="lz4", clevel=5, shuffle=zc.BloscShuffle.bitshuffle)]}
        if name in keep_bits:
            bits = keep_bits[name]
            if var.dtype.kind != "f" or not 1 <= int(bits) <= 23:
                raise ValueError(f"keep_bits[{name!r}]: expected 1-23 mantissa bits of a float32 variable, "
                                 f"got {bits!r} for {var.dtype}")
            with warnings.catch_warnings():
                # Zarr notes that numcodecs codecs are outside the v3 specification.
                warnings.simplefilter("ignore")
                out[name]["filters"] = [zc.numcodecs.BitRound(keepbits=int(bits))]
    return out


def write_store(ds: xr.Dataset, path, *, overwrite: bool = False):
    """Write a new store at ``path`` from ``ds`` (lazy Dask variables are computed).

    The store appears at ``path`` only once complete. With ``overwrite=True`` an existing
    store at ``path`` is replaced, after the new one is complete.

    Parameters
    ----------
    ds : xarray.Dataset
    path : str or path-like
        A directory ending in ``.zarr`` by convention.
    overwrite : bool
        Replace an existing store at ``path``.

    Returns
    -------
    str
        The store's path.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; choose another path or pass overwrite=True")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}")
    ds = ds.copy()
    ds.attrs[_FORMAT_KEY] = FORMAT_VERSION
    ds.attrs[_PENDING_KEY] = []
    try:
        write = ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, compute=False,
                           encoding=_encoding(ds))
        progress.compute(write)
        if os.path.exists(path):
            old = f"{tmp}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _group_attrs(path: str) -> dict:
    if not os.path.isdir(path):
        raise StoreError(f"{path}: no such store (expected a Zarr directory)")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise StoreError(f"{path}: not a Zarr group: {exc}") from exc
    return dict(group.attrs)


def open_dataset(path, *, incomplete: str = "raise") -> xr.Dataset:
    """Open a store lazily: no image data is read until it is computed.

    Parameters
    ----------
    path : str or path-like
    incomplete : {"raise", "drop"}
        What to do with variables whose write was interrupted: raise
        :class:`IncompleteStoreError` (default) or leave them out of the dataset.

    Returns
    -------
    xarray.Dataset
        Dask-backed, chunked as stored (one micrograph per chunk for ``image``).
    """
    if incomplete not in ("raise", "drop"):
        raise ValueError(f"incomplete must be 'raise' or 'drop', got {incomplete!r}")
    path = os.fspath(path)
    attrs = _group_attrs(path)
    if _FORMAT_KEY not in attrs:
        raise StoreError(f"{path}: a Zarr group, but not a cryodask store (no '{_FORMAT_KEY}')")
    pending = list(attrs.get(_PENDING_KEY, []))
    if pending and incomplete == "raise":
        raise IncompleteStoreError(
            f"{path}: the write of {pending} did not finish; rerun the step that writes them, "
            "or open with incomplete='drop' to read the rest"
        )
    ds = xr.open_zarr(path, consolidated=False, zarr_format=3, chunks={})
    return ds.drop_vars([name for name in pending if name in ds.variables])


def write_variables(ds: xr.Dataset, path, *, overwrite: bool = False, keep_bits: dict | None = None) -> None:
    """Add the data variables of ``ds`` to an existing store, as new variables.

    ``ds`` must share the store's dimensions (e.g. ``micrograph``); its coordinates are not
    rewritten. While the write runs the variables are listed as pending in the store, so a
    crash leaves them detectably incomplete. ``keep_bits`` (variable -> mantissa bits)
    stores those float variables lossily, e.g. ``{"image_restored": 8}``: the rounding
    error is below ``2^-(bits+1)`` of each value (``benchmarks/bench_codecs.py`` reports it
    against the image's spread and the space it saves).

    Raises
    ------
    ValueError
        A variable exists already and ``overwrite`` is False.
    """
    path = os.fspath(path)
    attrs = _group_attrs(path)
    if _FORMAT_KEY not in attrs:
        raise StoreError(f"{path}: not a cryodask store")
    names = list(ds.data_vars)
    group = zarr.open_group(path, mode="r+")
    existing = [name for name in names if name in group]
    if existing and not overwrite:
        raise ValueError(f"{path}: already holds {existing}; pass overwrite=True to replace them")
    # Codecs are chosen when an array is created: a replaced array keeps its own.
    replaced_lossy = sorted(set(keep_bits or {}) & set(existing))
    if replaced_lossy:
        raise ValueError(f"{path}: {replaced_lossy} exist already and keep their codecs; "
                         "write them under new names to store them with keep_bits")
    encoding = {name: codecs for name, codecs in _encoding(ds, keep_bits).items() if name not in existing}
    pending = sorted(set(attrs.get(_PENDING_KEY, [])) | set(names))
    group.attrs[_PENDING_KEY] = pending
    ds = ds.drop_vars([c for c in ds.coords if c in group], errors="ignore")
    # xarray rewrites the group's attributes on append: hand it the store's own.
    ds.attrs = {**attrs, _PENDING_KEY: pending}
    progress.compute(ds.to_zarr(path, mode="a", zarr_format=3, consolidated=False, compute=False,
                                encoding=encoding))
    group = zarr.open_group(path, mode="r+")
    group.attrs[_PENDING_KEY] = sorted(set(group.attrs.get(_PENDING_KEY, [])) - set(names))


def per_micrograph(datasets) -> xr.Dataset:
    """The variables with one value per micrograph of several datasets, one after the other.

    Datasets of different image shapes cannot share a store; their per-micrograph results
    (CTF, noise, scores, names) can share a table. Variables missing from any of them are
    left out; image-sized variables are left out.
    """
    datasets = list(datasets)
    if len(datasets) == 1:
        ds = datasets[0]
        return ds[[k for k, v in ds.data_vars.items() if v.dims == ("micrograph",)]]
    names = [k for k, v in datasets[0].data_vars.items()
             if v.dims == ("micrograph",) and all(k in d and d[k].dims == ("micrograph",) for d in datasets[1:])]
    parts = [d[names].drop_vars([c for c in d.coords], errors="ignore") for d in datasets]
    return xr.concat(parts, dim="micrograph", data_vars="all", coords="minimal", compat="override",
                     combine_attrs="drop_conflicts")
