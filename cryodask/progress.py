"""Run a Dask computation, with a progress display when asked for.

The display is off for library calls and on for the command line (which sets the Dask
config key ``cryodask.progress``). With a distributed client the work is submitted to it
and followed with Dask's text progress bar (:func:`compute`) or a count of finished tasks
(:func:`compute_each`); otherwise Dask's local ``ProgressBar`` is used.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import dask
import dask.config

__all__ = ["compute", "compute_each"]


def _current_client():
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(*objects, progress: bool | None = None):
    """``dask.compute(*objects)``, shown with a progress bar when ``progress`` is on.

    ``progress=None`` reads the Dask config key ``cryodask.progress`` (default False).
    """
    with _quiet_large_graphs():
        return _compute(objects, _progress_on(progress))


def _progress_on(progress: bool | None) -> bool:
    return bool(dask.config.get("cryodask.progress", default=False)) if progress is None else progress


@contextlib.contextmanager
def _quiet_large_graphs():
    # A dataset's gain estimate and defect map (a few MB) ride along with the graph, once;
    # distributed's hint about large graphs says nothing the user can act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        yield


def _compute(objects, progress):
    if not progress:
        return dask.compute(*objects)
    client = _current_client()
    if client is None:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0, dt=0.5):
            return dask.compute(*objects)
    from distributed import progress as distributed_progress

    futures = client.compute(list(objects))
    distributed_progress(futures, notebook=False)
    return tuple(f.result() for f in futures)


def compute_each(tasks, also=(), *, progress: bool | None = None) -> list:
    """The results of ``tasks`` (Dask objects, e.g. one per chunk), computed with ``also``.

    With a distributed client each result is gathered as soon as its task finishes and then
    released on the workers, so that what they hold does not grow with the number of tasks
    (``dask.compute`` keeps every result on the workers until the last one is done); the
    progress, when on, is a count of finished tasks. Without a client, :func:`compute`.
    """
    tasks, also = list(tasks), list(also)
    client = _current_client()
    if client is None or not tasks:
        return list(compute(*tasks, *also, progress=progress)[:len(tasks)])
    progress = _progress_on(progress)
    from distributed import as_completed

    with _quiet_large_graphs():
        futures = client.compute(tasks + also)
    where = {future.key: i for i, future in enumerate(futures)}
    results = [None] * len(tasks)
    for done, (future, result) in enumerate(as_completed(futures, with_results=True), start=1):
        i = where[future.key]
        if i < len(tasks):
            results[i] = result
        future.release()
        if progress:
            print(f"\r{done} of {len(futures)} tasks done", end="\n" if done == len(futures) else "",
                  file=sys.stderr, flush=True)
    return results
