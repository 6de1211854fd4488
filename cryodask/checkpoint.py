"""Resumable computation: per-micrograph results kept on disk as each chunk completes.

A pass over a dataset (fit every micrograph's CTF, decompose its noise, ...) is a lazy
xarray object whose variables run along ``micrograph``. :meth:`Checkpoint.compute` computes
it chunk by chunk, each chunk's task writing its results to one file the moment it is done
(under a temporary name, then renamed: a file that exists is whole). When the run is
interrupted and started again, the chunks with a file are read back instead of computed.
Every kernel of cryodask is deterministic for given inputs, so a resumed result is
identical to an uninterrupted one.

A checkpoint belongs to one computation: it carries a key (the inputs and settings that
determine the results), and a checkpoint with another key is discarded, not reused.
"""

from __future__ import annotations

import json
import os
import shutil

import dask
import numpy as np
import xarray as xr

__all__ = ["Checkpoint", "compute_by_chunk"]

_KEY_FILE = "checkpoint.json"


def _save(path, names, *arrays):
    tmp = path + ".partial.npz"
    payload = {}
    for name, values in zip(names, arrays):
        values = np.asarray(values)
        # Text is stored as fixed-width unicode so the file loads without pickle.
        payload[name] = values.astype(str) if values.dtype == object else values
    np.savez(tmp, **payload)
    os.replace(tmp, path)
    return path


def _chunk_blocks(array):
    """One Delayed per chunk of the first axis, the other axes in one piece."""
    whole = array.rechunk({axis: -1 for axis in range(1, array.ndim)})
    delayed = whole.to_delayed(optimize_graph=False)
    return list(delayed.reshape(delayed.shape[0], -1)[:, 0])


def _by_chunk(lazy, what):
    """``lazy`` as a Dataset whose Dask variables share one chunking along ``micrograph``:
    (was a DataArray, the dataset, the Dask variables' names, the chunks' bounds)."""
    as_array = isinstance(lazy, xr.DataArray)
    ds = lazy.to_dataset(name="__value__") if as_array else lazy
    ds = ds.assign_coords({k: v.compute() for k, v in ds.coords.items() if v.chunks is not None})
    names = [k for k, v in ds.data_vars.items() if v.chunks is not None]
    for k in names:
        if ds[k].dims[0] != "micrograph":
            raise ValueError(f"{what}: variable {k} does not run along micrograph first")
    bounds = np.zeros(1, int)
    if names:
        chunks = ds[names[0]].chunks[0]
        ds = ds.assign({k: ds[k].chunk({"micrograph": chunks}) for k in names})
        bounds = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
    return as_array, ds, names, bounds


def _assembled(lazy, as_array, ds, names, parts):
    """The computed result from each chunk's variables (``parts``, in chunk order)."""
    if names:
        values = {}
        for k in names:
            stacked = np.concatenate([part[k] for part in parts], axis=0)
            if ds[k].dtype == object:
                stacked = stacked.astype(object)
            values[k] = (ds[k].dims, stacked, ds[k].attrs)
        ds = ds.assign(values)
    out = ds.compute()
    if not as_array:
        return out
    value = out["__value__"]
    value.name = lazy.name
    return value


def _gathered(names, *arrays):
    return {name: np.asarray(values) for name, values in zip(names, arrays)}


def compute_by_chunk(lazy, also=()):
    """Compute ``lazy`` (a Dataset or DataArray along ``micrograph``) one task per chunk of
    micrographs that yields all its variables, as :meth:`Checkpoint.compute` does without
    the files.

    The variables of a chunk then share their upstream tasks (reading, cleaning) and a chunk
    is finished before the next ones pile up: the memory held grows with the chunk, not with
    the dataset (computed as a whole, several outputs over the same images may be ordered
    output by output, holding every micrograph's intermediates meanwhile). ``also``: other
    Dask work computed in the same call.
    """
    from cryodask import progress

    as_array, ds, names, bounds = _by_chunk(lazy, "compute_by_chunk")
    blocks = {k: _chunk_blocks(ds[k].data) for k in names}
    tasks = [dask.delayed(_gathered, pure=False)(names, *[blocks[k][i] for k in names])
             for i in range(len(bounds) - 1)]
    parts = progress.compute_each(tasks, also) if tasks or also else []
    return _assembled(lazy, as_array, ds, names, parts)


class Checkpoint:
    """A folder of finished chunks for the passes of one computation.

    Parameters
    ----------
    directory : str
        Created when missing. A key other than ``key`` found there empties it first.
    key : dict
        JSON-serialisable description of everything the results depend on.
    echo : callable, optional
        Told how many micrographs of each pass were read back.

    Attributes
    ----------
    resumed : dict
        Pass name -> micrographs read back instead of computed, in this run.
    """

    def __init__(self, directory, key: dict, *, echo=None):
        self.directory = os.fspath(directory)
        self.echo = echo
        self.resumed: dict[str, int] = {}
        text = json.dumps(key, sort_keys=True, default=str)
        key_path = os.path.join(self.directory, _KEY_FILE)
        if os.path.isdir(self.directory):
            try:
                with open(key_path, encoding="utf-8") as fh:
                    same = fh.read() == text
            except OSError:
                same = False
            if not same:
                shutil.rmtree(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        with open(key_path, "w", encoding="utf-8") as fh:
            fh.write(text)

    def remove(self) -> None:
        """Delete the folder (once the results are stored for good)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def compute(self, name: str, lazy, also=(), *, offset: int | None = None):
        """Compute ``lazy`` (a Dataset or DataArray along ``micrograph``), resuming.

        Dask-backed variables must have ``micrograph`` as their first dimension; they are
        computed one chunk of micrographs per task. Variables already in memory and the
        coordinates are taken as they are. ``also``: other Dask work (e.g. tasks that write
        files) computed in the same call, sharing the tasks it has in common with ``lazy``.
        ``offset``: the index of ``lazy``'s first micrograph in the dataset, when it is one
        batch of a pass (the files are named by the dataset's indices).
        """
        from cryodask import progress

        as_array, ds, lazy_names, bounds = _by_chunk(lazy, f"checkpoint {name}")
        folder = os.path.join(self.directory, name)
        os.makedirs(folder, exist_ok=True)
        parts = []
        if lazy_names:
            first = offset or 0
            paths = [os.path.join(folder, f"{a + first:07d}-{b + first:07d}.npz")
                     for a, b in zip(bounds[:-1], bounds[1:])]
            todo = [(i, p) for i, p in enumerate(paths) if not os.path.isfile(p)]
            done = int(bounds[-1]) - sum(int(bounds[i + 1] - bounds[i]) for i, _ in todo)
            if done:
                self.resumed[name] = self.resumed.get(name, 0) + done
                if self.echo is not None:
                    batch = "" if offset is None else f" (the batch from micrograph {first})"
                    self.echo(f"{name}: {done} of {bounds[-1]} micrographs read back from {folder}{batch}")
            # One Delayed per chunk and variable over the unoptimised graph, so that the
            # variables of a chunk share their upstream tasks (optimising each separately
            # would rename, and so repeat, the work they have in common).
            blocks = {k: _chunk_blocks(ds[k].data) for k in lazy_names}
            tasks = [dask.delayed(_save, pure=False)(p, lazy_names, *[blocks[k][i] for k in lazy_names])
                     for i, p in todo]
            if tasks or also:
                progress.compute_each(tasks, also)
            for p in paths:
                with np.load(p) as part:
                    parts.append({k: part[k] for k in lazy_names})
        elif also:
            progress.compute(*also)
        return _assembled(lazy, as_array, ds, lazy_names, parts)
