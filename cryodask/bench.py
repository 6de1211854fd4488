"""The end-to-end benchmark: the pipeline against the floor, measured in the same run.

``cryodask bench [--size 1024] [--count 8] [--json FILE]`` simulates ``count`` micrographs,
ingests them into a store, then times on that store:

* the **floor**: each micrograph read, one ``rfft2`` and one ``irfft2`` (``scipy.fft``, the
  faster of the FFTs at hand), written back as a new store variable -- nothing else;
* the pipeline's stages, each timed alone (each reads and cleans the micrographs again):
  the dataset pass (defects and gain), cleaning + regions + CTF, the causal noise model
  (one pass over the images, then priors and the particle spectrum), and restoration
  (Wiener, written to the store) -- a breakdown;
* the **pipeline** as ``cryodask run`` and ``cryodask score`` do it, in two passes over the
  images: :func:`cryodask.pipeline.score_dataset` with the restored micrographs written as
  MRC files in its second pass (CTF, noise model, rules, scores and restoration).

Each is a Dask computation on the current scheduler. Reported: seconds per micrograph,
MB/s of float32 micrograph data, and the ratio to the floor; the peak resident memory of
this process during each (sampled every 10 ms: ``ru_maxrss`` cannot be reset), the
pipeline's as ``peak_rss_bytes``; and each distributed worker's peak. The test data are
simulated in a child process, whose peak (the simulator holds several micrographs'
intermediates per thread: 6.1 GB for 8 of 4096²) is reported apart and is no part of the
others. The machine is shared and noisy: compare the ratios, not the absolute times,
between runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import time

import numpy as np
import scipy.fft

__all__ = ["run_benchmark", "run_scaling"]


def _floor_block(block):
    out = np.empty(block.shape, np.float32)
    for i in range(block.shape[0]):
        f = scipy.fft.rfft2(block[i].astype(np.float32))
        out[i] = scipy.fft.irfft2(f, s=block.shape[1:]).astype(np.float32)
    return out


def _own_peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports kilobytes


class _PeakRSS:
    """This process's peak resident memory while the block runs, sampled every 10 ms."""

    def __enter__(self):
        import threading

        import psutil

        self._process = psutil.Process()
        self.bytes = self._process.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.01):
                self.bytes = max(self.bytes, self._process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, self._process.memory_info().rss)
        return False


def _measured(name, compute, seconds, peaks):
    """``compute()``, with its seconds and this process's peak memory while it ran kept
    under ``name``."""
    with _PeakRSS() as peak:
        start = time.perf_counter()
        found = compute()
        seconds[name] = time.perf_counter() - start
    peaks[name] = peak.bytes
    return found


def _simulate(folder, size, count, seed):
    """The benchmark's test data (run in a child process); returns its peak memory."""
    import dask

    from cryodask.simulate import DatasetRanges, Detector, draw_micrograph_params, write_simulated_dataset

    params = draw_micrograph_params(count, shape=(size, size), seed=seed,
                                    ranges=DatasetRanges(n_hot_pixels=(50, 200), n_xrays=(2, 10)))
    with dask.config.set(scheduler="threads"):
        write_simulated_dataset(folder, params, seed=seed, detector=Detector(gain_std=0.02, n_dead_rows=1, seed=seed))
    return _own_peak_rss_bytes()


def _client():
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _worker_peaks() -> dict:
    """Each Dask worker process's peak resident memory (address -> bytes); empty without a
    distributed client (threads: the workers are this process)."""
    client = _client()
    return {} if client is None else client.run(_own_peak_rss_bytes)


def _worker_limits() -> dict:
    """Each Dask worker's memory limit (address -> bytes; 0: none); empty without a
    distributed client."""
    client = _client()
    if client is None:
        return {}
    return {address: int(info.get("memory_limit") or 0)
            for address, info in client.scheduler_info()["workers"].items()}


def run_benchmark(*, size: int = 1024, count: int = 8, workdir=None, seed: int = 0, stages: bool = True,
                  echo=print) -> dict:
    """Run the benchmark (see the module notes) and return its figures.

    Returns
    -------
    dict
        ``floor_mb_per_s``, ``pipeline_mb_per_s``, ``ratio_to_floor``, ``peak_rss_bytes``,
        ``stages`` (name -> seconds, seconds per micrograph, MB/s, ratio to the floor), and
        the run's ``size``, ``count`` and machine. With ``stages=False`` the stages are not
        timed apart (the floor and the pipeline only: for large counts).
    """
    import concurrent.futures
    import multiprocessing

    import xarray as xr

    from cryodask import pipeline
    from cryodask.ingest import ingest
    from cryodask.io.store import write_variables

    if size < 256 or count < 1:
        raise ValueError(f"need size >= 256 and count >= 1, got {size} and {count}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        # The test data are made in a child process, not by the process or workers measured.
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
            simulation_peak = child.submit(_simulate, os.path.join(tmp, "sim"), size, count, seed).result()
        seconds, peaks = {}, {}
        store = os.path.join(tmp, "b.zarr")
        ds = _measured("ingest", lambda: ingest(os.path.join(tmp, "sim", "*.mrc"), store), seconds, peaks)

        def floor():
            image = ds["image"]
            done = xr.DataArray(image.data.map_blocks(_floor_block, dtype=np.float32), dims=image.dims)
            write_variables(xr.Dataset({"floor": done}), store)

        _measured("floor", floor, seconds, peaks)
        if stages:
            _time_stages(ds, store, count, seconds, peaks)
        run_time, run_peaks = {}, {}  # not among the stages: it is the whole the stages make up
        _measured("pipeline", lambda: pipeline.score_dataset(ds, restore_to=os.path.join(tmp, "restored")),
                  run_time, run_peaks)
        run_seconds, run_peak = run_time["pipeline"], run_peaks["pipeline"]

    workers = _worker_peaks()
    megabytes = count * size * size * 4 / 1e6
    stages = {}
    for name, s in seconds.items():
        stages[name] = {"seconds": s, "seconds_per_micrograph": s / count, "mb_per_s": megabytes / s,
                        "ratio_to_floor": s / seconds["floor"], "peak_rss_bytes": peaks[name]}
    stages_seconds = sum(s for name, s in seconds.items() if name not in ("ingest", "floor"))
    result = {
        "size": size, "count": count, "megabytes": megabytes,
        "floor_mb_per_s": megabytes / seconds["floor"], "pipeline_seconds": run_seconds,
        "pipeline_mb_per_s": megabytes / run_seconds, "ratio_to_floor": run_seconds / seconds["floor"],
        "stages_seconds": stages_seconds, "peak_rss_bytes": run_peak,
        "peak_rss_process_bytes": _own_peak_rss_bytes(), "simulation_peak_rss_bytes": simulation_peak,
        "peak_rss_workers_bytes": workers, "worker_memory_limit_bytes": _worker_limits(),
        "stages": stages,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    echo(f"{count} micrographs of {size}² ({megabytes:.0f} MB of float32) on {os.cpu_count()} CPUs")
    echo(f"{'stage':<30} {'s / micrograph':>15} {'MB/s':>9} {'x floor':>8} {'peak GB':>8}")
    for name, row in stages.items():
        echo(f"{name:<30} {row['seconds_per_micrograph']:>15.3f} {row['mb_per_s']:>9.1f} {row['ratio_to_floor']:>8.2f} "
             f"{row['peak_rss_bytes'] / 1e9:>8.2f}")
    if stages_seconds > 0:
        echo(f"{'the stages, summed':<30} {stages_seconds / count:>15.3f} {megabytes / stages_seconds:>9.1f} "
             f"{stages_seconds / seconds['floor']:>8.2f}")
    echo(f"{'pipeline (2 passes, as run)':<30} {run_seconds / count:>15.3f} {result['pipeline_mb_per_s']:>9.1f} "
         f"{result['ratio_to_floor']:>8.2f} {run_peak / 1e9:>8.2f}")
    echo(f"peak resident memory of this process: {result['peak_rss_process_bytes'] / 1e9:.2f} GB "
         f"(the test data's simulation, in a child process: {simulation_peak / 1e9:.2f} GB)")
    if workers:
        limits = result["worker_memory_limit_bytes"]
        echo("peak resident memory of each worker process: "
             + ", ".join(f"{v / 1e9:.2f} GB" + (f" (limit {limits[a] / 1e9:.2f} GB)" if limits.get(a) else "")
                         for a, v in workers.items()))
    return result


def _time_stages(ds, store, count, seconds, peaks) -> None:
    """Each stage of the pipeline alone (each reads and cleans the micrographs again), its
    seconds and peak resident memory."""
    import xarray as xr

    from cryodask import pipeline, progress
    from cryodask.clean import clean_for_fitting, measure_defects
    from cryodask.io.store import open_dataset, write_variables

    def timed(name, compute):
        return _measured(name, compute, seconds, peaks)

    measured = timed("dataset pass (defects, gain)", lambda: measure_defects(ds))

    def clean_and_fit():
        work, exclude, extra = clean_for_fitting(ds, measured=measured)
        (ctf,) = progress.compute(xr.merge([pipeline.estimate_ctf_dataset(work, exclude=exclude), extra]))
        return work, ctf

    work, ctf = timed("clean + regions + CTF", clean_and_fit)
    timed("noise model", lambda: progress.compute(pipeline.noise_dataset(
        ds, ctf, gain_estimate=measured, defects=measured.defects, prior=count >= 4)))
    timed("clean + restore + write",
          lambda: write_variables(pipeline.restore_dataset(work, ctf).to_dataset(), store))
    open_dataset(store)  # the writes are complete and readable


def run_scaling(*, size: int, counts, cluster: str | None = None, stages: bool = True, echo=print) -> dict:
    """:func:`run_benchmark` for each count, each in a fresh process (so that each peak
    memory is its own); then how the time per micrograph and the peak memory change with
    the count.

    Returns
    -------
    dict
        ``runs``: each run's figures, as :func:`run_benchmark` returns them.
    """
    import subprocess
    import sys

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            out = os.path.join(tmp, f"{count}.json")
            command = [sys.executable, "-m", "cryodask.cli", "bench", "--size", str(size), "--count", str(count),
                       "--json", out]
            if cluster:
                command += ["--cluster", cluster]
            if not stages:
                command.append("--no-stages")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"cryodask bench --count {count} failed: {done.stderr.strip()[-2000:]}")
            with open(out, encoding="utf-8") as fh:
                runs.append(json.load(fh))
            echo(done.stdout.rstrip())
    first = runs[0]
    first_per = first["megabytes"] / first["pipeline_mb_per_s"] / first["count"]
    echo(f"\n{'count':>6} {'pipeline s / micrograph':>24} {'x the first':>12} {'x floor':>8} {'pipeline peak GB':>17}")
    for run in runs:
        per = run["megabytes"] / run["pipeline_mb_per_s"] / run["count"]
        echo(f"{run['count']:>6} {per:>24.3f} {per / first_per:>12.2f} {run['ratio_to_floor']:>8.2f} "
             f"{run['peak_rss_bytes'] / 1e9:>17.2f}")
    return {"size": size, "counts": list(counts), "runs": runs}


def write_json(result: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
