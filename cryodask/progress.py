"""Run a Dask computation, with a progress display when asked for.

The display is off for library calls and on for the command line (which sets the Dask
config key ``cryodask.progress``). With a distributed client the work is submitted to it
and followed with Dask's text progress bar (:func:`compute`) or a count of finished tasks
(:func:`compute_each`); otherwise Dask's local ``ProgressBar`` is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings

import dask
import dask.config

__all__ = ["ALLOCATOR_ENVIRON", "allocator_environ_to_set", "compute", "compute_each", "keep_large_blocks",
           "trim_memory"]


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


def compute_each(tasks, also=(), *, progress: bool | None = None, window: int | None = None) -> list:
    """The results of ``tasks`` (Dask objects, e.g. one per chunk), computed with ``also``.

    The work streams: each task is computed with its share of ``also`` (the items at the
    same fraction of that list: both run along the micrographs in order, e.g. a chunk's
    measurements and the task writing its restored file, which share its reading and
    cleaning), at most ``window`` of them at a time (default: twice the threads computing),
    the next started as one finishes. What is in flight, and so the memory it holds, does
    not grow with the number of tasks: handed to the distributed scheduler all at once, the
    second pass of 1907 micrographs of 1024² held 570-650 MB per worker after ~250 of them
    and rising; streamed, 0.30-0.55 GB to the end (the workers' statistical profiler, since
    turned off, held ~40 MB pickled of that by then: :mod:`cryodask.cluster`). The graph is
    built once; each task's part
    is taken from it, and the keys several tasks share (the dataset's gain estimate, the
    store's arrays) are computed once, first, and held until the end.

    With a distributed client each result is gathered as soon as its task finishes and then
    released on the workers; the progress, when on, is a count of finished tasks. Without
    one, the tasks run on Dask's threads (or the configured scheduler, a window at a time).
    """
    tasks, also = list(tasks), list(also)
    if not tasks and not also:
        return []
    groups = _groups(len(tasks), len(also))
    dsk, keys, dependencies = _materialised(tasks + also)
    wanted = [[keys[i] for i in group] for group in groups]
    shared = _shared(dependencies, wanted)
    parts = [_part(dsk, dependencies, w, stop=shared) for w in wanted]
    progress = _progress_on(progress)
    client = _current_client()
    with _quiet_large_graphs():
        if client is not None:
            window = window or 2 * max(sum(client.nthreads().values()), 1)
            results = _stream_distributed(client, dsk, dependencies, parts, wanted, window, progress)
        else:
            results = _stream_local(dsk, dependencies, parts, wanted, window, progress)
    return [results[keys[i]] for i in range(len(tasks))]


def _groups(n_tasks: int, n_also: int) -> list:
    """Indices into ``tasks + also`` computed together: each task with the items of ``also``
    at the same fraction of their list (each item of ``also`` alone when there are no tasks)."""
    if n_tasks == 0:
        return [[i] for i in range(n_also)]
    bounds = [round(j * n_also / n_tasks) for j in range(n_tasks + 1)]
    return [[j] + [n_tasks + a for a in range(bounds[j], bounds[j + 1])] for j in range(n_tasks)]


def _materialised(objects):
    """The graph of ``objects`` as one dict (unoptimised: the objects share their upstream
    keys), each object's key, and every key's dependencies."""
    from dask.core import get_dependencies
    from dask.highlevelgraph import HighLevelGraph

    # Merged layer by layer: the objects share most layers (made per object and then
    # merged, the graph was materialised once per object -- quadratic; 24 GB for the second
    # pass over 1907 micrographs).
    dsk = dict(HighLevelGraph.merge(*[obj.__dask_graph__() for obj in objects]))
    keys = []
    for obj in objects:
        (key,) = obj.__dask_keys__() if hasattr(obj, "__dask_keys__") else (obj.key,)
        keys.append(key)
    return dsk, keys, {key: get_dependencies(dsk, key) for key in dsk}


def _shared(dependencies, wanted) -> set:
    """The keys that more than one group of ``wanted`` keys needs (e.g. the dataset's gain
    estimate, the store's arrays): computed once, before the groups."""
    first, shared = {}, set()
    for g, keys in enumerate(wanted):
        seen, stack = set(), list(keys)
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            if first.setdefault(key, g) != g:
                shared.add(key)
            stack.extend(dependencies[key])
    return shared


def _part(dsk, dependencies, keys, stop) -> tuple:
    """The part of ``dsk`` that computes ``keys``, short of the keys in ``stop``; and the
    keys of ``stop`` it needs."""
    seen, needed, stack = set(), set(), list(keys)
    while stack:
        key = stack.pop()
        if key in stop:
            needed.add(key)
        elif key not in seen:
            seen.add(key)
            stack.extend(dependencies[key])
    return {key: dsk[key] for key in seen}, needed


def _frontier(dsk, dependencies, parts) -> tuple:
    """The shared keys the parts need, and the graph that computes them."""
    keys = sorted(set().union(*(needed for _, needed in parts)), key=str)
    return keys, _part(dsk, dependencies, keys, stop=set())[0]


def trim_memory() -> int:
    """Hand back to the system the memory the C allocator keeps after it was freed (glibc's
    ``malloc_trim``; elsewhere nothing is done). The kernels allocate and free arrays of a
    micrograph's size from several threads; glibc keeps much of what they free in its
    per-thread arenas, and the process's resident memory then grew with the count of
    micrographs (64 micrographs of 512² scored on threads: second pass 0.485 GB resident
    for 0.06 GB of live arrays; trimmed as each chunk finishes, 0.449 GB; every 20 ms, 0.298 GB).
    Returns 1 if memory was released."""
    libc = _glibc()
    return int(libc.malloc_trim(0)) if libc else 0


#: glibc's ``mallopt`` parameters.
_M_ARENA_MAX, _M_MMAP_MAX = -8, -4
#: The same two settings as environment variables, for processes not yet started (Dask
#: workers: ``distributed.nanny.pre-spawn-environ``; the installed command line,
#: :func:`cryodask.cli.console`). glibc reads them as a process starts, before any thread
#: has taken an arena of its own.
ALLOCATOR_ENVIRON = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0"}


def keep_large_blocks() -> bool:
    """Let the C allocator reuse the memory of freed micrograph-sized arrays (glibc; else
    nothing is done): one arena for all threads, and every block from its heap. By default
    glibc gives every block above 32 MB -- at 4096², each float32 half-plane spectrum,
    each float64 image -- fresh pages from the system, and touching them costs more than
    much of the arithmetic (on this project's 2-core virtual machine, one thread: 3.3 s of
    system time per micrograph for 179 000 page faults, against 4.8 s of its own). A
    thread's own arena holds no block above 64 MB: it too takes fresh pages. Set at run
    time, the settings take less well than from the process's start, most likely because
    threads already running keep their arenas (the process has OpenBLAS's threads once
    NumPy is imported): the pipeline on 8 micrographs of 4096² on two threads took
    3.98-3.99 s per micrograph with them set so, 3.53-3.64 s with them in the environment
    when the process started (:data:`ALLOCATOR_ENVIRON`), 4.23 s with neither (system time
    1.65-1.94, 1.12-1.18 and 2.81 s per micrograph; peak resident memory 2.82-2.92,
    2.92-2.94 and 2.98 GB). The command line and the worker processes cryodask starts have
    them from their start; this call sets them for a process already running. The freed
    memory is still handed back between chunks (:func:`trim_memory`). Returns True if both
    settings took."""
    libc = _glibc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1)) & bool(libc.mallopt(_M_MMAP_MAX, 0))


def allocator_environ_to_set() -> dict:
    """The settings of :data:`ALLOCATOR_ENVIRON` for a process about to start, when this
    process's environment has none of them and the C library is glibc; else empty (a
    user's own setting of any of them is kept)."""
    if not _glibc() or any(name in os.environ for name in ALLOCATOR_ENVIRON):
        return {}
    return dict(ALLOCATOR_ENVIRON)


def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else False."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc


_libc = None


def _show(done: int, total: int, progress: bool) -> None:
    if progress:
        print(f"\r{done} of {total} tasks done", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _stream_distributed(client, dsk, dependencies, parts, wanted, window, progress) -> dict:
    from distributed import as_completed

    keys, graph = _frontier(dsk, dependencies, parts)
    held = client.get(graph, keys, sync=False) if keys else []  # kept on the workers until the end
    results, left, started, done = {}, {}, 0, 0
    running = as_completed(with_results=True)
    group_of = {key: g for g, w in enumerate(wanted) for key in w}

    def start(g):
        for future in client.get(parts[g][0], wanted[g], sync=False):
            running.add(future)
        left[g] = len(wanted[g])

    try:
        while started < min(window, len(parts)):
            start(started)
            started += 1
        for future, result in running:
            results[future.key] = result
            future.release()
            g = group_of[future.key]
            left[g] -= 1
            if left[g] == 0:
                done += 1
                _show(done, len(parts), progress)
                if done % window == 0:
                    client.run(trim_memory)
                if started < len(parts):
                    start(started)
                    started += 1
    finally:
        for future in held:
            future.release()
    return results


def _stream_local(dsk, dependencies, parts, wanted, window, progress) -> dict:
    import concurrent.futures

    import dask.local
    import dask.threaded
    from dask._task_spec import DataNode
    from dask.base import get_scheduler

    get = get_scheduler() or dask.threaded.get
    keys, graph = _frontier(dsk, dependencies, parts)
    values = {key: DataNode(key, value) for key, value in zip(keys, get(graph, keys))} if keys else {}

    def whole(g):
        part, needed = parts[g]
        return {**part, **{key: values[key] for key in needed}}

    threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    results = {}
    if get is dask.threaded.get:
        # Each group on one thread, as many at a time as Dask's threaded scheduler runs
        # (fewer if the window is smaller).
        def run(g):
            found = dict(zip(wanted[g], dask.local.get_sync(whole(g), wanted[g])))
            trim_memory()
            return found

        with concurrent.futures.ThreadPoolExecutor(min(threads, window or threads)) as pool:
            for done, found in enumerate(pool.map(run, range(len(parts))), start=1):
                results.update(found)
                _show(done, len(parts), progress)
        return results
    window = window or 2 * threads
    for first in range(0, len(parts), window):
        batch = range(first, min(first + window, len(parts)))
        graph = {key: node for g in batch for key, node in whole(g).items()}
        batch_keys = [key for g in batch for key in wanted[g]]
        results.update(zip(batch_keys, get(graph, batch_keys)))
        trim_memory()
        _show(batch[-1] + 1, len(parts), progress)
    return results
